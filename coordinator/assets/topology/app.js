// The topology page: asks for an admin token, reads the coordinator's topology stream
// (GET v1/topology/stream, server-sent events read through fetch so that the token travels
// in the Authorization header, never in a URL) and draws each network as inline SVG:
// providers as columns, nodes as cards, workload addresses on their holder's card, paths as
// links. When a workload's holder changes between two pictures, its address glides from the
// old holder to the new one.
//
// Everything shown comes from the network and is set as text (textContent, attributes),
// never parsed as HTML.
'use strict';

(() => {
  const TOKEN_KEY = 'meshlink.topology.token';
  const NETWORK_KEY = 'meshlink.topology.network';
  const SVG = 'http://www.w3.org/2000/svg';
  // An event larger than this is not a picture the coordinator sends: the stream is dropped.
  const MAX_EVENT = 16 * 1024 * 1024;
  const MOVE_MS = 1200;

  // Layout, in SVG user units.
  const PAD = 16;
  const COL_W = 250;
  const COL_GAP = 80;
  // Inside each provider's column, right of its cards: where links between two of its own
  // nodes run, so that they stay apart from the links that leave the column.
  const LANE = 34;
  const GROUP_HEAD = 34;
  const CARD_HEAD = 44;
  const PILL_H = 20;
  const PILL_GAP = 4;
  const CARD_GAP = 14;

  const $ = (id) => document.getElementById(id);
  let controller = null;
  let retryTimer = null;
  let retryDelay = 500;
  // Per workload (network/name): where its pill was last drawn and by whom it was held.
  const placed = new Map();
  // Per workload: a move being drawn {fromX, fromY, start}.
  const moving = new Map();
  let movesAnimated = 0;
  let frameAsked = false;

  function setStatus(state, text) {
    const s = $('status');
    s.dataset.state = state;
    s.textContent = text;
  }

  function showLogin(error) {
    $('view').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = error || '';
    setStatus('idle', 'not connected');
  }

  function showView() {
    $('login').hidden = true;
    $('view').hidden = false;
    $('logout').hidden = false;
  }

  function stop() {
    if (controller) controller.abort();
    controller = null;
    clearTimeout(retryTimer);
  }

  function retry(why) {
    setStatus('connecting', why ? `reconnecting (${why})` : 'reconnecting');
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 10000);
  }

  async function connect() {
    stop();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      showLogin();
      return;
    }
    const network = sessionStorage.getItem(NETWORK_KEY) || '';
    const url = 'v1/topology/stream' + (network ? `?network=${encodeURIComponent(network)}` : '');
    const mine = new AbortController();
    controller = mine;
    setStatus('connecting', 'connecting');
    let res;
    try {
      res = await fetch(url, {
        headers: { Authorization: `Bearer ${token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: mine.signal,
      });
    } catch (e) {
      if (!mine.signal.aborted) retry('no answer');
      return;
    }
    if (res.status === 401 || res.status === 403 || res.status === 404) {
      let message = `${res.status} ${res.statusText}`;
      try {
        message = (await res.json()).error || message;
      } catch (e) { /* not JSON: keep the status line */ }
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(message);
      return;
    }
    if (!res.ok || !res.body) {
      retry(`${res.status}`);
      return;
    }
    showView();
    setStatus('live', 'live');
    retryDelay = 500;
    try {
      await read(res.body.getReader());
    } catch (e) {
      if (mine.signal.aborted) return;
    }
    if (!mine.signal.aborted) retry('stream ended');
  }

  // Reads server-sent events: blocks separated by a blank line, `event:` and `data:` fields,
  // `:` comments (keep-alives) ignored.
  async function read(reader) {
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true }).replace(/\r/g, '');
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        dispatch(block);
      }
      if (buf.length > MAX_EVENT) {
        reader.cancel();
        throw new Error('event too large');
      }
    }
  }

  function dispatch(block) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (event !== 'topology' || data.length === 0) return;
    let picture;
    try {
      picture = JSON.parse(data.join('\n'));
    } catch (e) {
      return;
    }
    render(picture);
  }

  function el(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // One network: columns of provider groups, node cards with their workloads, links.
  function layout(net) {
    const byHolder = new Map();
    for (const w of net.workloads) {
      if (w.holder === null) continue;
      if (!byHolder.has(w.holder)) byHolder.set(w.holder, []);
      byHolder.get(w.holder).push(w);
    }
    const nodes = new Map();
    const groups = [];
    let height = 0;
    net.providers.forEach((group, i) => {
      const gx = PAD + i * (COL_W + COL_GAP);
      let y = PAD + GROUP_HEAD;
      const cards = [];
      for (const node of group.nodes) {
        const held = byHolder.get(node.id) || [];
        const h = CARD_HEAD + held.length * (PILL_H + PILL_GAP) + (held.length ? 6 : 0);
        const card = { node, held, x: gx + 12, y, w: COL_W - 12 - LANE, h, col: i };
        nodes.set(node.id, card);
        cards.push(card);
        y += h + CARD_GAP;
      }
      groups.push({ group, x: gx, y: PAD, w: COL_W, h: y - PAD, cards });
      height = Math.max(height, y);
    });
    const width = PAD * 2 + Math.max(1, net.providers.length) * (COL_W + COL_GAP) - COL_GAP;
    return { nodes, groups, width, height: height + PAD };
  }

  // One link per pair of nodes: relayed if either end says so, else direct if either end
  // has a direct path, else unconfirmed; the lowest round trip reported.
  function links(net) {
    const pairs = new Map();
    for (const p of net.paths) {
      const [a, b] = p.from < p.to ? [p.from, p.to] : [p.to, p.from];
      const key = `${a}-${b}`;
      const l = pairs.get(key) || { a, b, kinds: new Set(), rtt: null };
      l.kinds.add(p.kind);
      if (p.rtt_us !== null && (l.rtt === null || p.rtt_us < l.rtt)) l.rtt = p.rtt_us;
      pairs.set(key, l);
    }
    return [...pairs.values()].map((l) => ({
      ...l,
      kind: l.kinds.has('relay') ? 'relay' : l.kinds.has('direct') ? 'direct' : 'unconfirmed',
    }));
  }

  function linkPath(ca, cb) {
    const ya = ca.y + 22;
    const yb = cb.y + 22;
    if (ca.col === cb.col) {
      const x = ca.x + ca.w;
      // The curve's apex sits at three quarters of its control points' reach.
      const reach = Math.min(LANE - 6, 10 + Math.abs(yb - ya) / 8) / 0.75;
      const bulge = x + reach;
      return { d: `M ${x} ${ya} C ${bulge} ${ya}, ${bulge} ${yb}, ${x} ${yb}`, mx: x + reach * 0.75, my: (ya + yb) / 2 + 4 };
    }
    const [l, r, yl, yr] = ca.col < cb.col ? [ca, cb, ya, yb] : [cb, ca, yb, ya];
    const x1 = l.x + l.w;
    const x2 = r.x;
    const mid = (x1 + x2) / 2;
    return { d: `M ${x1} ${yl} C ${mid} ${yl}, ${mid} ${yr}, ${x2} ${yr}`, mx: mid, my: (yl + yr) / 2 - 4 };
  }

  function render(picture) {
    const root = $('networks');
    const sections = [];
    const seen = new Set();
    const now = performance.now();
    for (const net of picture.networks) {
      const online = net.providers.reduce((n, g) => n + g.nodes.filter((x) => x.online).length, 0);
      const total = net.providers.reduce((n, g) => n + g.nodes.length, 0);
      const section = document.createElement('section');
      section.className = 'network';
      section.dataset.network = net.name;
      const h2 = document.createElement('h2');
      h2.textContent = net.name;
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = `${net.cidr} · map v${net.version} · ${online}/${total} online · ` +
        `${net.workloads.length} workload${net.workloads.length === 1 ? '' : 's'}`;
      h2.appendChild(meta);
      section.appendChild(h2);

      const lay = layout(net);
      const svg = el('svg', {
        class: 'mesh',
        width: lay.width,
        height: lay.height,
        viewBox: `0 0 ${lay.width} ${lay.height}`,
      });
      // Bottom to top: the providers' panels, the links, the nodes, the workloads.
      const panels = el('g', { class: 'panels' });
      svg.appendChild(panels);
      for (const g of lay.groups) {
        const name = g.group.provider === null ? 'no provider' : g.group.provider;
        panels.appendChild(el('rect', { class: 'panel', x: g.x, y: g.y, width: g.w, height: g.h, rx: 8 }));
        const gg = el('g', { class: 'provider', 'data-provider': g.group.provider === null ? '' : g.group.provider });
        gg.appendChild(el('text', { x: g.x + 12, y: g.y + 21 }, name));
        for (const c of g.cards) {
          const n = el('g', {
            class: 'node',
            'data-node': c.node.name,
            'data-id': c.node.id,
            'data-online': c.node.online ? 'true' : 'false',
          });
          n.appendChild(el('rect', { class: 'card', x: c.x, y: c.y, width: c.w, height: c.h, rx: 6 }));
          n.appendChild(el('circle', { class: 'dot', cx: c.x + 14, cy: c.y + 16, r: 5 }));
          n.appendChild(el('text', { class: 'name', x: c.x + 26, y: c.y + 20 }, c.node.name));
          n.appendChild(el('text', { class: 'address', x: c.x + 26, y: c.y + 36 },
            `${c.node.address}${c.node.online ? '' : ' · offline'}`));
          gg.appendChild(n);
        }
        svg.appendChild(gg);
      }
      const linkLayer = el('g', { class: 'links' });
      for (const l of links(net)) {
        const ca = lay.nodes.get(l.a);
        const cb = lay.nodes.get(l.b);
        if (!ca || !cb) continue;
        const p = linkPath(ca, cb);
        const nameA = ca.node.name;
        const nameB = cb.node.name;
        const path = el('path', { class: 'link', d: p.d, 'data-kind': l.kind, 'data-between': `${nameA} ${nameB}` });
        path.appendChild(el('title', {}, `${nameA} ↔ ${nameB}: ${l.kind}` +
          (l.rtt !== null ? `, ${(l.rtt / 1000).toFixed(1)} ms` : '')));
        linkLayer.appendChild(path);
        if (l.rtt !== null) {
          linkLayer.appendChild(el('text', { class: 'rtt', x: p.mx, y: p.my, 'text-anchor': 'middle' },
            `${(l.rtt / 1000).toFixed(1)} ms`));
        }
      }
      // Links over the panels, under the cards.
      panels.after(linkLayer);

      const pills = el('g', { class: 'workloads' });
      for (const c of lay.nodes.values()) {
        c.held.forEach((w, k) => {
          const key = `${net.name}/${w.name}`;
          const x = c.x + 10;
          const y = c.y + CARD_HEAD + k * (PILL_H + PILL_GAP);
          const g = el('g', {
            class: 'workload',
            'data-workload': w.name,
            'data-key': key,
            'data-holder': c.node.name,
            'data-state': w.state,
          });
          g.appendChild(el('rect', { x, y, width: c.w - 20, height: PILL_H, rx: PILL_H / 2 }));
          g.appendChild(el('text', { x: x + 10, y: y + 14 }, `${w.name} · ${w.address}`));
          pills.appendChild(g);
          const before = placed.get(key);
          if (before && before.holder !== null && before.holder !== w.holder) {
            // Start from where the pill is seen now (mid-move, if a move is being drawn).
            const from = currentPosition(key, before, now);
            moving.set(key, { fromX: from.x, fromY: from.y, start: now });
            movesAnimated += 1;
          }
          placed.set(key, { x, y, holder: w.holder });
          seen.add(key);
        });
      }
      svg.appendChild(pills);
      section.appendChild(svg);

      const detached = net.workloads.filter((w) => w.holder === null);
      if (detached.length) {
        const p = document.createElement('p');
        p.className = 'detached';
        p.textContent = 'Detached: ';
        detached.forEach((w, i) => {
          const s = document.createElement('span');
          s.dataset.workload = w.name;
          s.dataset.holder = '';
          s.textContent = `${i ? ', ' : ''}${w.name} (${w.address})`;
          p.appendChild(s);
          const key = `${net.name}/${w.name}`;
          placed.set(key, { x: 0, y: 0, holder: null });
          moving.delete(key);
          seen.add(key);
        });
        section.appendChild(p);
      }
      sections.push(section);
    }
    for (const key of [...placed.keys()]) {
      if (!seen.has(key)) {
        placed.delete(key);
        moving.delete(key);
      }
    }
    root.replaceChildren(...sections);
    $('empty').hidden = picture.networks.length > 0;
    document.body.dataset.movesAnimated = String(movesAnimated);
    document.body.dataset.pictures = String(Number(document.body.dataset.pictures || 0) + 1);
    animate(now);
  }

  function ease(t) {
    return t < 0.5 ? 4 * t * t * t : 1 - Math.pow(-2 * t + 2, 3) / 2;
  }

  function currentPosition(key, at, now) {
    const m = moving.get(key);
    if (!m) return { x: at.x, y: at.y };
    const t = Math.min(1, (now - m.start) / MOVE_MS);
    const e = ease(t);
    return { x: m.fromX + (at.x - m.fromX) * e, y: m.fromY + (at.y - m.fromY) * e };
  }

  // Draws every move in progress, each pill offset from its new place towards the old one,
  // the offset shrinking to nothing over MOVE_MS, with a dashed trail behind it.
  function animate(now) {
    frameAsked = false;
    for (const trail of document.querySelectorAll('path.trail')) trail.remove();
    for (const [key, m] of moving) {
      const at = placed.get(key);
      const pill = document.querySelector(`g.workload[data-key="${CSS.escape(key)}"]`);
      if (!at || !pill) {
        moving.delete(key);
        continue;
      }
      const t = Math.min(1, (now - m.start) / MOVE_MS);
      if (t >= 1) {
        pill.removeAttribute('transform');
        pill.dataset.moving = 'false';
        moving.delete(key);
        continue;
      }
      const pos = currentPosition(key, at, now);
      pill.setAttribute('transform', `translate(${pos.x - at.x} ${pos.y - at.y})`);
      pill.dataset.moving = 'true';
      const svg = pill.ownerSVGElement;
      const trail = el('path', {
        class: 'trail',
        d: `M ${m.fromX + 40} ${m.fromY + PILL_H / 2} L ${pos.x + 40} ${pos.y + PILL_H / 2}`,
      });
      svg.insertBefore(trail, pill.parentNode);
    }
    if (moving.size && !frameAsked) {
      frameAsked = true;
      requestAnimationFrame(animate);
    }
  }

  function start() {
    $('login').addEventListener('submit', (e) => {
      e.preventDefault();
      const token = $('token').value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      sessionStorage.setItem(NETWORK_KEY, $('network').value.trim());
      $('token').value = '';
      $('login-error').textContent = '';
      connect();
    });
    $('logout').addEventListener('click', () => {
      stop();
      sessionStorage.removeItem(TOKEN_KEY);
      sessionStorage.removeItem(NETWORK_KEY);
      $('networks').replaceChildren();
      placed.clear();
      moving.clear();
      showLogin();
    });
    connect();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();

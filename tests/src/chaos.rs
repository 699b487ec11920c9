//! Chaos on the provider bed (hardening issue, item 11): faults injected in the providers'
//! router with nftables, a capture of the whole underlay, and the check that nothing of the
//! overlay ever crossed the underlay in the clear.
//!
//! - [`Faults`]: a table of our own, `chaos`, in the [`Providers`] router's namespace. It cuts
//!   one provider off from every other (and so from a coordinator on another provider)
//!   ([`Faults::partition`]), and drops a share of every packet between two hosts at random,
//!   both ways ([`Faults::loss`]): routed packets between providers in an `ip` table, bridged
//!   ones within a provider in a `bridge` table, so that each packet meets the dice once. It
//!   also drops what one host sends to others ([`Faults::block`]), which holds up a move that
//!   waits for that host's answer.
//! - [`Capture`]: `tcpdump -i any` in a namespace, written to a pcap file. Run in the router's
//!   namespace it sees every underlay packet of every host, since each host's veth has its
//!   other end there (on a provider's bridge); it sees them as they come in, before any fault
//!   drops them.
//! - [`plaintext_check`]: reads the pcap file ([`pcap`]) and reports every packet that carries
//!   the overlay in the clear ([`Leak`]): an IPv4 packet with an overlay address as its source
//!   or destination, an IPv4 header with an overlay address anywhere inside the payload of
//!   another packet (a plaintext overlay packet carried in UDP or TCP), or an ARP message about
//!   an overlay address. [`PlaintextReport`] also counts the WireGuard messages seen, so that a
//!   check of a capture that missed the tunnels cannot pass unnoticed.
//!
//! An embedded header counts only when it could be a real packet: version 4, a valid header
//! checksum, a total length that fits in what follows, a known protocol (ICMP, TCP, UDP), a
//! non-zero TTL, the reserved flag clear, and an address in the overlay prefix. Random bytes
//! (WireGuard and QUIC ciphertext) pass all of that at one offset with a chance of the order
//! of 10^-15 for a /16, so the check does not cry wolf over a few hundred megabytes.

use std::cell::Cell;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::nat::nft;
use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::providers::{Provider, Providers};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;

/// The nftables table the faults live in (in the router's namespace, `ip` and `bridge`).
const TABLE: &str = "chaos";

// ---------------------------------------------------------------------------------------------
// Faults.

/// Faults injected in the providers' router: partitions and random loss. See the module
/// documentation. The tables go with the router's namespace.
#[derive(Debug)]
pub struct Faults {
    router: NsRef,
    bridges: Vec<String>,
    /// What the rules dropped before they were flushed (their counters go with them).
    flushed: Cell<u64>,
}

impl Faults {
    /// Installs the (empty) fault tables in `providers`' router.
    ///
    /// # Panics
    /// When `nft` is missing or refuses the tables.
    pub fn install(providers: &Providers) -> Faults {
        let router = providers.router.handle();
        nft(
            &router,
            &format!(
                "table ip {TABLE} {{
  chain partition {{
  }}
  chain block {{
  }}
  chain loss {{
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    jump partition
    jump block
    jump loss
  }}
}}
table bridge {TABLE} {{
  chain loss {{
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    jump loss
  }}
}}
"
            ),
        );
        let bridges = (0..providers.count())
            .map(|i| providers.bridge(Provider(i)).to_owned())
            .collect();
        Faults {
            router,
            bridges,
            flushed: Cell::new(0),
        }
    }

    /// Cuts `provider` off: nothing is routed from its hosts to any other provider or back.
    /// Its hosts still reach each other. Replaces an earlier partition.
    ///
    /// # Panics
    /// When there is no such provider or nftables fails.
    pub fn partition(&self, provider: Provider) {
        let bridge = &self.bridges[provider.0];
        self.keep_count("ip", "partition");
        nft(
            &self.router,
            &format!(
                "flush chain ip {TABLE} partition\n\
                 add rule ip {TABLE} partition iifname \"{bridge}\" counter drop\n\
                 add rule ip {TABLE} partition oifname \"{bridge}\" counter drop\n"
            ),
        );
    }

    /// Lifts the partition, if any.
    ///
    /// # Panics
    /// When nftables fails.
    pub fn heal(&self) {
        self.keep_count("ip", "partition");
        nft(&self.router, &format!("flush chain ip {TABLE} partition\n"));
    }

    /// Drops every packet from `from` to any of `to` (one way only), until
    /// [`Faults::unblock`]; adds to earlier blocks. Only packets between providers pass the
    /// router: `from` and `to` must be on different ones.
    ///
    /// # Panics
    /// When nftables fails.
    pub fn block(&self, from: Ipv4Addr, to: &[Ipv4Addr]) {
        let mut script = String::new();
        for to in to {
            script.push_str(&format!(
                "add rule ip {TABLE} block ip saddr {from} ip daddr {to} counter drop\n"
            ));
        }
        nft(&self.router, &script);
    }

    /// Lifts every [`Faults::block`].
    ///
    /// # Panics
    /// When nftables fails.
    pub fn unblock(&self) {
        self.keep_count("ip", "block");
        nft(&self.router, &format!("flush chain ip {TABLE} block\n"));
    }

    /// Drops `percent` % of the packets between any two hosts, at random, each way;
    /// `0` lifts it.
    ///
    /// # Panics
    /// When `percent` is over 100 or nftables fails.
    pub fn loss(&self, percent: u8) {
        assert!(percent <= 100, "a share of packets: {percent} %");
        let mut script = String::new();
        for family in ["ip", "bridge"] {
            self.keep_count(family, "loss");
            script.push_str(&format!("flush chain {family} {TABLE} loss\n"));
            if percent > 0 {
                script.push_str(&format!(
                    "add rule {family} {TABLE} loss numgen random mod 100 < {percent} counter drop\n"
                ));
            }
        }
        nft(&self.router, &script);
    }

    /// How many packets the faults dropped so far, partition and loss together.
    ///
    /// # Panics
    /// When nftables fails.
    pub fn dropped(&self) -> u64 {
        let now: u64 = [
            ("ip", "partition"),
            ("ip", "block"),
            ("ip", "loss"),
            ("bridge", "loss"),
        ]
        .iter()
        .map(|(family, chain)| self.chain_drops(family, chain))
        .sum();
        self.flushed.get() + now
    }

    /// Adds what a chain's rules dropped to [`Faults::flushed`] before the chain is flushed.
    fn keep_count(&self, family: &str, chain: &str) {
        self.flushed
            .set(self.flushed.get() + self.chain_drops(family, chain));
    }

    fn chain_drops(&self, family: &str, chain: &str) -> u64 {
        counter_packets(
            &self
                .router
                .run("nft", &["list", "chain", family, TABLE, chain]),
        )
    }
}

/// The sum of every `counter packets N` in an nftables listing.
fn counter_packets(listing: &str) -> u64 {
    listing
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Capture.

/// How many bytes of each packet the capture keeps: all of them (the largest packet on a
/// veth, a GSO packet, is 64 KiB); [`PlaintextReport::truncated`] counts any that were not.
const SNAPLEN: u32 = 65_535 + 64;

/// How long [`Capture::start`] waits for tcpdump to say it is listening.
const CAPTURE_READY: Duration = Duration::from_secs(10);

/// A running `tcpdump` writing every packet of one interface (or `any`) of a namespace to a
/// pcap file. [`Capture::stop`] ends it and reads the file.
#[derive(Debug)]
pub struct Capture {
    process: Process,
    file: PathBuf,
    what: String,
}

/// A finished capture.
#[derive(Debug)]
pub struct Captured {
    /// The pcap file.
    pub file: PathBuf,
    /// Its contents.
    pub bytes: Vec<u8>,
    /// What tcpdump said the kernel dropped (packets the capture missed); `None` when it did
    /// not say.
    pub dropped_by_kernel: Option<u64>,
    /// What was captured, for messages.
    pub what: String,
}

impl Capture {
    /// Starts `tcpdump -i INTERFACE` in `ns`, whole packets, each written as it comes, into
    /// `dir/TAG.pcap`; returns once it listens.
    ///
    /// # Panics
    /// When tcpdump cannot start or does not listen within 10 s.
    pub fn start(ns: &NsRef, interface: &str, dir: &ScratchDir, tag: &str) -> Capture {
        let file = dir.join(&format!("{tag}.pcap"));
        let log = dir.join(&format!("{tag}.tcpdump.log"));
        // -Z root: tcpdump would otherwise drop to its own user, who may not write here.
        // --immediate-mode and -U: every packet reaches the file as it is seen, so that what
        // was sent just before the stop is in it.
        // --immediate-mode makes libpcap use a ring of fixed slots, one packet each, as
        // large as the snapshot length: 64 KiB slots (a GSO packet is at most that) in a
        // 64 MiB buffer hold a thousand packets between two reads.
        let mut cmd = ns.daemon_command("tcpdump");
        cmd.args(["-i", interface, "-n", "-s", &SNAPLEN.to_string()])
            .args(["-B", "65536", "-U", "--immediate-mode", "-Z", "root", "-w"])
            .arg(&file);
        let what = format!("{interface} in {}", ns.name());
        let process = Process::spawn(&format!("tcpdump on {what}"), cmd, &log, Stdout::Log);
        let mut capture = Capture {
            process,
            file,
            what,
        };
        let ready = wait_until(CAPTURE_READY, "tcpdump to listen", || {
            if !capture.process.is_running() {
                return Some(false);
            }
            capture
                .process
                .log()
                .contains("listening on")
                .then_some(true)
        });
        assert!(
            ready == Ok(true),
            "tcpdump on {} did not start: {ready:?}\n{}",
            capture.what,
            capture.process.log_tail(20)
        );
        capture
    }

    /// Ends tcpdump (SIGINT, so that it writes what it holds and its counts) and reads the
    /// file.
    ///
    /// # Panics
    /// When tcpdump does not exit within 5 s of SIGINT or the file cannot be read.
    pub fn stop(mut self) -> Captured {
        self.process.signal(Signal::SIGINT);
        let status = self.process.wait_timeout(Duration::from_secs(5));
        assert!(status.is_some(), "tcpdump on {} ignored SIGINT", self.what);
        let log = self.process.log();
        let bytes = std::fs::read(&self.file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}\n{log}", self.file.display()));
        Captured {
            file: self.file.clone(),
            bytes,
            dropped_by_kernel: dropped_by_kernel(&log),
            what: self.what.clone(),
        }
    }

    /// The pcap file being written.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// `N` from tcpdump's closing line `N packets dropped by kernel`.
fn dropped_by_kernel(log: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.trim()
            .strip_suffix(" packets dropped by kernel")?
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------------------------
// The check.

/// An IPv4 prefix, such as the overlay's `100.64.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Prefix {
    addr: u32,
    len: u8,
}

impl Ipv4Prefix {
    /// `addr/len`, the host bits cleared.
    ///
    /// # Panics
    /// When `len` is over 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Ipv4Prefix {
        assert!(len <= 32, "prefix length {len}");
        Ipv4Prefix {
            addr: u32::from(addr) & mask(len),
            len,
        }
    }

    /// Whether `addr` is in the prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.len) == self.addr
    }
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

impl FromStr for Ipv4Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/LENGTH"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if len > 32 {
            return Err(format!("{s:?}: prefix length over 32"));
        }
        Ok(Ipv4Prefix::new(addr, len))
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.len)
    }
}

/// One packet of a capture that carried the overlay in the clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// Its number in the capture, from 1 (as tcpdump and Wireshark count).
    pub packet: usize,
    /// What it was.
    pub what: String,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "packet {}: {}", self.packet, self.what)
    }
}

/// What [`plaintext_check`] found in a capture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaintextReport {
    /// Packets read.
    pub packets: usize,
    /// IPv4 packets among them.
    pub ipv4: usize,
    /// UDP datagrams that look like WireGuard messages (handshakes, cookies, data).
    pub wireguard: usize,
    /// Packets not captured whole (the check saw only their start).
    pub truncated: usize,
    /// Packets carrying the overlay in the clear.
    pub leaks: Vec<Leak>,
}

impl PlaintextReport {
    /// One line: what was read and how many leaks, with the first few of them.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} packets ({} IPv4, {} WireGuard messages, {} truncated), {} carrying the overlay \
             in the clear",
            self.packets,
            self.ipv4,
            self.wireguard,
            self.truncated,
            self.leaks.len()
        );
        for leak in self.leaks.iter().take(10) {
            out.push_str(&format!("\n  {leak}"));
        }
        if self.leaks.len() > 10 {
            out.push_str(&format!("\n  ... and {} more", self.leaks.len() - 10));
        }
        out
    }
}

/// Reads a pcap file and reports every packet that carries an address of `overlay` in the
/// clear (see the module documentation).
///
/// # Errors
/// When the file is not a pcap file of a link type it knows ([`pcap::packets`]).
pub fn plaintext_check(file: &[u8], overlay: Ipv4Prefix) -> Result<PlaintextReport, String> {
    let packets = pcap::packets(file)?;
    let mut report = PlaintextReport {
        packets: packets.len(),
        ..PlaintextReport::default()
    };
    for (i, packet) in packets.iter().enumerate() {
        report.truncated += usize::from(packet.truncated);
        if let Some(what) = inspect(packet, overlay, &mut report) {
            report.leaks.push(Leak {
                packet: i + 1,
                what,
            });
        }
    }
    Ok(report)
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// What is wrong with one packet, if anything; counts it in `report`.
fn inspect(
    packet: &pcap::Packet<'_>,
    overlay: Ipv4Prefix,
    report: &mut PlaintextReport,
) -> Option<String> {
    let data = packet.data;
    match packet.ethertype {
        ETHERTYPE_IPV4 => {
            let header = Ipv4Header::parse(data)?;
            report.ipv4 += 1;
            if overlay.contains(header.src) || overlay.contains(header.dst) {
                return Some(format!(
                    "IPv4 {} -> {} ({}) on the wire",
                    header.src,
                    header.dst,
                    proto_name(header.proto)
                ));
            }
            let end = usize::from(header.total_len).clamp(header.len, data.len());
            let payload = &data[header.len..end];
            if header.proto == PROTO_UDP && is_wireguard(payload.get(8..).unwrap_or_default()) {
                report.wireguard += 1;
            }
            embedded(payload, overlay).map(|inner| {
                format!(
                    "IPv4 {} -> {} ({}) carries {inner}",
                    header.src,
                    header.dst,
                    proto_name(header.proto)
                )
            })
        }
        ETHERTYPE_IPV6 => {
            let payload = data.get(40..)?;
            let next = data.get(6).copied();
            if next == Some(PROTO_UDP) && is_wireguard(payload.get(8..).unwrap_or_default()) {
                report.wireguard += 1;
            }
            embedded(payload, overlay).map(|inner| format!("an IPv6 packet carries {inner}"))
        }
        ETHERTYPE_ARP => {
            // Ethernet/IPv4 ARP: sender protocol address at 14, target at 24.
            let is_ipv4 = data.get(2..6) == Some(&[0x08, 0x00, 6, 4][..]);
            let sender = data.get(14..18).and_then(ipv4_at)?;
            let target = data.get(24..28).and_then(ipv4_at)?;
            (is_ipv4 && (overlay.contains(sender) || overlay.contains(target)))
                .then(|| format!("ARP between {sender} and {target} on the wire"))
        }
        _ => None,
    }
}

fn ipv4_at(b: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = b.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_ICMP => "ICMP".into(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        other => format!("protocol {other}"),
    }
}

/// An IPv4 header's fields that the check reads.
#[derive(Debug, Clone, Copy)]
struct Ipv4Header {
    /// Header length in bytes.
    len: usize,
    total_len: u16,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

impl Ipv4Header {
    /// The header at the start of `b`, if it is version 4 with a sane header length.
    fn parse(b: &[u8]) -> Option<Ipv4Header> {
        let first = *b.first()?;
        let len = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || len < 20 || b.len() < len {
            return None;
        }
        Some(Ipv4Header {
            len,
            total_len: u16::from_be_bytes([b[2], b[3]]),
            proto: b[9],
            src: ipv4_at(&b[12..16])?,
            dst: ipv4_at(&b[16..20])?,
        })
    }
}

/// The first IPv4 header with an overlay address inside `payload` that could be a real packet
/// (see the module documentation), described with its offset.
fn embedded(payload: &[u8], overlay: Ipv4Prefix) -> Option<String> {
    (0..payload.len()).find_map(|offset| {
        let b = &payload[offset..];
        // Cheap first: version 4 with a header length of 5 to 15 words.
        if !(0x45..=0x4f).contains(&b[0]) {
            return None;
        }
        let h = Ipv4Header::parse(b)?;
        let plausible = usize::from(h.total_len) >= h.len
            && usize::from(h.total_len) <= b.len()
            && b[6] & 0x80 == 0
            && b[8] != 0
            && matches!(h.proto, PROTO_ICMP | PROTO_TCP | PROTO_UDP)
            && checksum(&b[..h.len]) == 0
            && (overlay.contains(h.src) || overlay.contains(h.dst));
        plausible.then(|| {
            format!(
                "a plaintext IPv4 packet {} -> {} ({}) at payload offset {offset}",
                h.src,
                h.dst,
                proto_name(h.proto)
            )
        })
    })
}

/// The Internet checksum of `b`: 0 over a header whose checksum field is right.
pub fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("the folded sum fits in 16 bits")
}

/// Whether a UDP payload looks like a WireGuard message: handshake initiation (148 bytes),
/// response (92), cookie reply (64), or transport data (16-byte header, a 16-byte tag, and
/// padded plaintext, so a multiple of 16).
fn is_wireguard(udp_payload: &[u8]) -> bool {
    if udp_payload.len() < 4 || udp_payload[1..4] != [0, 0, 0] {
        return false;
    }
    match udp_payload[0] {
        1 => udp_payload.len() == 148,
        2 => udp_payload.len() == 92,
        3 => udp_payload.len() == 64,
        4 => udp_payload.len() >= 32 && udp_payload.len().is_multiple_of(16),
        _ => false,
    }
}

/// A well-formed IPv4 ICMP echo request from `src` to `dst` with `payload`: what an overlay
/// packet looks like before WireGuard seals it (for showing that the check catches one).
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(payload);
    let sum = checksum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&sum);
    let total = u16::try_from(20 + icmp.len()).expect("a small packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, PROTO_ICMP, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&sum);
    ip.extend_from_slice(&icmp);
    ip
}

/// Reading pcap files (the classic format tcpdump writes with `-w`), just enough for
/// [`plaintext_check`]: each packet's network-layer protocol and bytes.
pub mod pcap {
    /// Ethernet.
    pub const LINKTYPE_ETHERNET: u32 = 1;
    /// Raw IP, no link header (what tcpdump writes for a TUN device).
    pub const LINKTYPE_RAW: u32 = 101;
    /// Linux cooked capture v1 (`-i any` of older tcpdumps).
    pub const LINKTYPE_LINUX_SLL: u32 = 113;
    /// Linux cooked capture v2 (`-i any` since tcpdump 4.99).
    pub const LINKTYPE_LINUX_SLL2: u32 = 276;

    /// One captured packet: its network-layer protocol (an ethertype) and bytes from the
    /// network header on.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Packet<'a> {
        /// The ethertype (0x0800 IPv4, 0x86dd IPv6, 0x0806 ARP, ...).
        pub ethertype: u16,
        /// From the network header on, as captured.
        pub data: &'a [u8],
        /// Whether the packet was longer than what was captured of it.
        pub truncated: bool,
    }

    /// Every packet of a pcap file, in order.
    ///
    /// # Errors
    /// A file that is not classic pcap, of another link type than Ethernet, raw IP or Linux
    /// cooked (v1 or v2), or that ends inside a record. A file of nothing but its header (a
    /// capture that saw nothing) is no error.
    pub fn packets(file: &[u8]) -> Result<Vec<Packet<'_>>, String> {
        let header = file
            .get(..24)
            .ok_or_else(|| format!("{} bytes: too short for a pcap header", file.len()))?;
        let magic = [header[0], header[1], header[2], header[3]];
        let big_endian = match magic {
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
            other => return Err(format!("not a pcap file (magic {other:02x?})")),
        };
        let u32_at = |b: &[u8], at: usize| {
            let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            if big_endian {
                u32::from_be_bytes(w)
            } else {
                u32::from_le_bytes(w)
            }
        };
        // The upper bits of the link-type field may carry FCS information.
        let link = u32_at(header, 20) & 0x0fff_ffff;
        let mut out = Vec::new();
        let mut at = 24;
        while at < file.len() {
            let record = file
                .get(at..at + 16)
                .ok_or_else(|| format!("the file ends inside the record header at byte {at}"))?;
            let len = usize::try_from(u32_at(record, 8)).expect("32-bit lengths fit");
            let truncated = u32_at(record, 12) > u32_at(record, 8);
            let start = at + 16;
            let frame = file.get(start..start + len).ok_or_else(|| {
                format!(
                    "the file ends inside packet {} at byte {start}",
                    out.len() + 1
                )
            })?;
            let packet = network_layer(link, frame)?.unwrap_or(Packet {
                // Too short for its link header: kept as an unknown protocol.
                ethertype: 0,
                data: &[],
                truncated,
            });
            out.push(Packet {
                truncated,
                ..packet
            });
            at = start + len;
        }
        Ok(out)
    }

    fn network_layer(link: u32, frame: &[u8]) -> Result<Option<Packet<'_>>, String> {
        let be16 = |at: usize| {
            frame
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        let packet = |ethertype: Option<u16>, from: usize| {
            Some(Packet {
                ethertype: ethertype?,
                data: frame.get(from..)?,
                truncated: false,
            })
        };
        Ok(match link {
            LINKTYPE_ETHERNET => match be16(12) {
                // One 802.1Q tag.
                Some(0x8100) => packet(be16(16), 18),
                other => packet(other, 14),
            },
            LINKTYPE_RAW => {
                let ethertype = match frame.first().map(|b| b >> 4) {
                    Some(4) => Some(0x0800),
                    Some(6) => Some(0x86dd),
                    _ => None,
                };
                packet(ethertype, 0)
            }
            LINKTYPE_LINUX_SLL => packet(be16(14), 16),
            LINKTYPE_LINUX_SLL2 => packet(be16(0), 20),
            other => return Err(format!("pcap link type {other} is not read here")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERLAY: &str = "100.64.0.0/16";

    fn overlay() -> Ipv4Prefix {
        OVERLAY.parse().unwrap()
    }

    /// A classic pcap file (little-endian, microseconds) of `frames` with link type `link`.
    fn pcap_file(link: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&262_144u32.to_le_bytes());
        out.extend_from_slice(&link.to_le_bytes());
        for (i, frame) in frames.iter().enumerate() {
            let len = u32::try_from(frame.len()).unwrap();
            out.extend_from_slice(&u32::try_from(i).unwrap().to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(frame);
        }
        out
    }

    /// An SLL2 header (what `tcpdump -i any` writes) before `ip`.
    fn sll2(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = ethertype.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 0, 0, 7, 0, 1, 0, 6, 0, 1, 2, 3, 4, 5, 0, 0]);
        f.extend_from_slice(ip);
        f
    }

    /// An Ethernet header before `ip`.
    fn ethernet(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(ip);
        f
    }

    /// A UDP datagram between underlay addresses carrying `payload`.
    fn udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let udp_len = u16::try_from(8 + payload.len()).unwrap();
        let total = udp_len + 20;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 2, 0x40, 0, 64, PROTO_UDP, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = checksum(&ip).to_be_bytes();
        ip[10..12].copy_from_slice(&sum);
        ip.extend_from_slice(&51820u16.to_be_bytes());
        ip.extend_from_slice(&51820u16.to_be_bytes());
        ip.extend_from_slice(&udp_len.to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(payload);
        ip
    }

    /// A WireGuard transport data message of `len` bytes of "ciphertext" from a xorshift
    /// generator (no RNG crate: the test is deterministic).
    fn wireguard_data(seed: &mut u64, len: usize) -> Vec<u8> {
        let mut m = vec![4, 0, 0, 0];
        m.extend((0..12 + len).map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            seed.to_le_bytes()[3]
        }));
        m
    }

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
    const NODE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const WORKLOAD: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);

    #[test]
    fn prefixes() {
        let p = overlay();
        assert!(p.contains(NODE) && p.contains(WORKLOAD));
        assert!(!p.contains(Ipv4Addr::new(100, 65, 0, 1)) && !p.contains(A));
        assert_eq!(
            "100.64.9.9/10".parse::<Ipv4Prefix>().unwrap().to_string(),
            "100.64.0.0/10"
        );
        assert!("0.0.0.0/0".parse::<Ipv4Prefix>().unwrap().contains(A));
        assert!("100.64.0.0".parse::<Ipv4Prefix>().is_err());
        assert!("100.64.0.0/33".parse::<Ipv4Prefix>().is_err());
    }

    #[test]
    fn checksums_of_the_packets_built_here_are_right() {
        let p = icmp_echo(NODE, WORKLOAD, b"hello");
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(checksum(&p[20..]), 0);
        assert_eq!(p.len(), 20 + 8 + 5);
    }

    #[test]
    fn an_overlay_address_on_the_wire_is_a_leak() {
        let file = pcap_file(
            pcap::LINKTYPE_LINUX_SLL2,
            &[
                sll2(ETHERTYPE_IPV4, &udp(A, B, b"fine")),
                sll2(ETHERTYPE_IPV4, &icmp_echo(NODE, B, b"x")),
                sll2(ETHERTYPE_IPV4, &icmp_echo(A, WORKLOAD, b"y")),
            ],
        );
        let report = plaintext_check(&file, overlay()).unwrap();
        assert_eq!((report.packets, report.ipv4), (3, 3));
        assert_eq!(
            report.leaks,
            vec![
                Leak {
                    packet: 2,
                    what: "IPv4 100.64.0.2 -> 198.18.2.10 (ICMP) on the wire".into()
                },
                Leak {
                    packet: 3,
                    what: "IPv4 198.18.1.10 -> 100.64.50.10 (ICMP) on the wire".into()
                },
            ]
        );
    }

    #[test]
    fn a_plaintext_overlay_packet_inside_udp_is_a_leak() {
        let inner = icmp_echo(NODE, WORKLOAD, &[0xab; 56]);
        let mut shifted = b"hdr".to_vec();
        shifted.extend_from_slice(&inner);
        let file = pcap_file(
            pcap::LINKTYPE_ETHERNET,
            &[
                ethernet(ETHERTYPE_IPV4, &udp(A, B, &inner)),
                ethernet(ETHERTYPE_IPV4, &udp(B, A, &shifted)),
            ],
        );
        let report = plaintext_check(&file, overlay()).unwrap();
        let what: Vec<&str> = report.leaks.iter().map(|l| l.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "IPv4 198.18.1.10 -> 198.18.2.10 (UDP) carries a plaintext IPv4 packet \
                 100.64.0.2 -> 100.64.50.10 (ICMP) at payload offset 8",
                "IPv4 198.18.2.10 -> 198.18.1.10 (UDP) carries a plaintext IPv4 packet \
                 100.64.0.2 -> 100.64.50.10 (ICMP) at payload offset 11",
            ]
        );
        // The same packet with its header checksum broken is not taken for one.
        let mut broken = inner.clone();
        broken[10] ^= 0xff;
        let file = pcap_file(
            pcap::LINKTYPE_ETHERNET,
            &[ethernet(ETHERTYPE_IPV4, &udp(A, B, &broken))],
        );
        assert!(plaintext_check(&file, overlay()).unwrap().leaks.is_empty());
        // Nor one of another network.
        let other = icmp_echo(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), b"z");
        let file = pcap_file(
            pcap::LINKTYPE_ETHERNET,
            &[ethernet(ETHERTYPE_IPV4, &udp(A, B, &other))],
        );
        assert!(plaintext_check(&file, overlay()).unwrap().leaks.is_empty());
    }

    #[test]
    fn a_capture_of_the_overlay_interface_is_all_leaks() {
        // What tcpdump writes for a TUN device: raw IP.
        let frames: Vec<Vec<u8>> = (0..5).map(|_| icmp_echo(NODE, WORKLOAD, b"ping")).collect();
        let report = plaintext_check(&pcap_file(pcap::LINKTYPE_RAW, &frames), overlay()).unwrap();
        assert_eq!(report.leaks.len(), 5);
    }

    #[test]
    fn arp_about_an_overlay_address_is_a_leak() {
        let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1];
        arp.extend_from_slice(&A.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&WORKLOAD.octets());
        let mut fine = arp.clone();
        fine[24..28].copy_from_slice(&B.octets());
        let file = pcap_file(
            pcap::LINKTYPE_LINUX_SLL2,
            &[sll2(ETHERTYPE_ARP, &fine), sll2(ETHERTYPE_ARP, &arp)],
        );
        let report = plaintext_check(&file, overlay()).unwrap();
        assert_eq!(report.leaks.len(), 1, "{report:?}");
        assert_eq!(report.leaks[0].packet, 2);
        assert!(report.leaks[0].what.contains("100.64.50.10"));
    }

    #[test]
    fn wireguard_ciphertext_is_no_leak() {
        // 20,000 data messages, about 12 MB of pseudo-random bytes: not one false alarm.
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let frames: Vec<Vec<u8>> = (0..20_000)
            .map(|i| {
                let len = 16 * (1 + (i % 40));
                sll2(ETHERTYPE_IPV4, &udp(A, B, &wireguard_data(&mut seed, len)))
            })
            .collect();
        let report =
            plaintext_check(&pcap_file(pcap::LINKTYPE_LINUX_SLL2, &frames), overlay()).unwrap();
        assert_eq!(report.leaks, vec![]);
        assert_eq!(report.wireguard, 20_000);
        assert!(report
            .summary()
            .starts_with("20000 packets (20000 IPv4, 20000 WireGuard"));
    }

    #[test]
    fn reads_both_byte_orders_and_cooked_v1() {
        let frame = {
            let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f.extend_from_slice(&icmp_echo(NODE, B, b""));
            f
        };
        let little = pcap_file(pcap::LINKTYPE_LINUX_SLL, std::slice::from_ref(&frame));
        // The same file written big-endian (nanosecond magic).
        let mut big = vec![0xa1, 0xb2, 0x3c, 0x4d, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0];
        big.extend_from_slice(&262_144u32.to_be_bytes());
        big.extend_from_slice(&pcap::LINKTYPE_LINUX_SLL.to_be_bytes());
        big.extend_from_slice(&[0; 8]);
        let len = u32::try_from(frame.len()).unwrap().to_be_bytes();
        big.extend_from_slice(&len);
        big.extend_from_slice(&len);
        big.extend_from_slice(&frame);
        for file in [little, big] {
            let report = plaintext_check(&file, overlay()).unwrap();
            assert_eq!(report.leaks.len(), 1, "{report:?}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(plaintext_check(b"short", overlay()).is_err());
        assert!(plaintext_check(&[0u8; 24], overlay()).is_err());
        let mut cut = pcap_file(pcap::LINKTYPE_RAW, &[icmp_echo(A, B, b"")]);
        cut.truncate(cut.len() - 3);
        assert!(plaintext_check(&cut, overlay())
            .unwrap_err()
            .contains("ends inside packet 1"));
        assert!(plaintext_check(&pcap_file(147, &[vec![0]]), overlay()).is_err());
        // A capture that saw nothing is read, and empty.
        let empty = plaintext_check(&pcap_file(pcap::LINKTYPE_RAW, &[]), overlay()).unwrap();
        assert_eq!(empty, PlaintextReport::default());
    }

    #[test]
    fn counts_packets_not_captured_whole() {
        let mut file = pcap_file(pcap::LINKTYPE_RAW, &[icmp_echo(A, B, b"")]);
        // The first record's original length, beyond what was captured.
        file[36..40].copy_from_slice(&1500u32.to_le_bytes());
        let report = plaintext_check(&file, overlay()).unwrap();
        assert_eq!((report.packets, report.truncated), (1, 1));
    }

    #[test]
    fn reads_what_tcpdump_says_at_the_end() {
        let log = "tcpdump: listening on any\n12 packets captured\n14 packets received by filter\n3 packets dropped by kernel\n";
        assert_eq!(dropped_by_kernel(log), Some(3));
        assert_eq!(dropped_by_kernel("nothing"), None);
    }

    #[test]
    fn sums_nftables_counters() {
        let listing = "table ip chaos {\n chain loss {\n  numgen random mod 100 < 5 counter packets 12 bytes 900 drop\n }\n chain partition {\n  iifname \"br\" counter packets 3 bytes 10 drop\n }\n}\n";
        assert_eq!(counter_packets(listing), 15);
    }
}

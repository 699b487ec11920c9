//! The rounds summed up: medians and worst cases, a markdown table and a JSON summary.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::measure::{PathCase, PathSample, RelayDelta, UpgradeSample};

/// Every round of one run, errors included.
#[derive(Debug, Default)]
pub struct Results {
    /// Per path case measured, its rounds in order.
    pub paths: Vec<(PathCase, Vec<Result<PathSample, String>>)>,
    /// The upgrade rounds, when measured.
    pub upgrade: Option<Vec<Result<UpgradeSample, String>>>,
}

/// The median of `values` (the mean of the two middle ones for an even count); `None` when
/// empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The largest of `values`.
fn worst(values: &[f64]) -> Option<f64> {
    values.iter().copied().max_by(f64::total_cmp)
}

/// The smallest of `values`.
fn best(values: &[f64]) -> Option<f64> {
    values.iter().copied().min_by(f64::total_cmp)
}

/// `median / worst` with `decimals`, or `-`.
fn median_worst(values: &[f64], decimals: usize) -> String {
    match (median(values), worst(values)) {
        (Some(m), Some(w)) => format!("{m:.decimals$} / {w:.decimals$}"),
        _ => "-".into(),
    }
}

/// `median [min-max]` with `decimals`, or `-`.
fn spread(values: &[f64], decimals: usize) -> String {
    match (median(values), best(values), worst(values)) {
        (Some(m), Some(lo), Some(hi)) if values.len() > 1 => {
            format!("{m:.decimals$} [{lo:.decimals$}-{hi:.decimals$}]")
        }
        (Some(m), _, _) => format!("{m:.decimals$}"),
        _ => "-".into(),
    }
}

/// The first line of an error, shortened, for the table and the JSON summary.
fn headline(error: &str) -> String {
    let line = error.lines().next().unwrap_or_default();
    if line.chars().count() > 240 {
        format!("{}...", line.chars().take(240).collect::<String>())
    } else {
        line.to_owned()
    }
}

/// How often each pair of paths (a1 -> b1, b1 -> a1) was seen at the first ping:
/// `direct x3`, `relay/udp, direct x1`.
fn first_paths(samples: &[&PathSample]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for s in samples {
        let [ab, ba] = &s.path_at_first_ping;
        let key = if ab == ba {
            ab.clone()
        } else {
            format!("{ab}, {ba}")
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

fn ok<T>(rounds: &[Result<T, String>]) -> Vec<&T> {
    rounds.iter().filter_map(|r| r.as_ref().ok()).collect()
}

fn errors<T>(rounds: &[Result<T, String>]) -> Vec<String> {
    rounds
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| headline(e))
        .collect()
}

/// The first distinct error, for a row that could not be measured.
fn why(rounds: &[Result<impl Sized, String>]) -> String {
    errors(rounds)
        .into_iter()
        .next()
        .unwrap_or_else(|| "no round ran".into())
}

/// The relay's drops during the flows, summed over the rounds, by reason (`rate_limited
/// 5200, congested 3 (of N frames relayed)`, `none (...)`), or `-` when nothing was relayed.
fn relay_drops(samples: &[&PathSample]) -> String {
    let deltas: Vec<&RelayDelta> = samples
        .iter()
        .filter_map(|s| s.relay_during_flow.as_ref())
        .filter(|d| d.frames > 0 || !d.dropped.is_empty())
        .collect();
    if deltas.is_empty() {
        return "-".into();
    }
    let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
    for d in &deltas {
        for (reason, n) in &d.dropped {
            *sum.entry(reason).or_insert(0) += n;
        }
    }
    let frames: u64 = deltas.iter().map(|d| d.frames).sum();
    let drops: Vec<String> = sum.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let drops = if drops.is_empty() {
        "none".to_owned()
    } else {
        drops.join(", ")
    };
    format!("{drops} (of {frames} frames relayed)")
}

/// The markdown tables.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    if !results.paths.is_empty() {
        out.push_str(
            "| path | rounds | agents joined, s | first ping both ways, s | path at first ping \
             (a1->b1, b1->a1) | path shown both ways, s |\n|---|---|---|---|---|---|\n",
        );
        for (case, rounds) in &results.paths {
            let good = ok(rounds);
            if good.is_empty() {
                out.push_str(&format!(
                    "| {} | 0/{} | not measurable: {} | | | |\n",
                    case.label(),
                    rounds.len(),
                    why(rounds)
                ));
                continue;
            }
            let pick = |f: fn(&PathSample) -> f64| good.iter().map(|s| f(s)).collect::<Vec<_>>();
            let paths: Vec<String> = first_paths(&good)
                .into_iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect();
            out.push_str(&format!(
                "| {} | {}/{} | {} | {} | {} | {} |\n",
                case.label(),
                good.len(),
                rounds.len(),
                median_worst(&pick(|s| s.joined_s), 2),
                median_worst(&pick(|s| s.first_ping_s), 2),
                paths.join("; "),
                median_worst(&pick(|s| s.settled_s), 2),
            ));
        }
        out.push_str("\nTimes from agent start: median / worst over the rounds measured.\n\n");
        out.push_str(
            "| path | TCP 1 stream Mbit/s | retransmits | ping idle avg / p99 ms | ping under \
             TCP avg / p99 ms | pings lost idle / loaded | relay drops during the flow |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for (case, rounds) in &results.paths {
            let good = ok(rounds);
            if good.is_empty() {
                out.push_str(&format!(
                    "| {} | not measurable | | | | | |\n",
                    case.label()
                ));
                continue;
            }
            let pick = |f: fn(&PathSample) -> f64| good.iter().map(|s| f(s)).collect::<Vec<_>>();
            let med = |f: fn(&PathSample) -> f64, d: usize| {
                median(&pick(f)).map_or_else(|| "-".into(), |m| format!("{m:.d$}"))
            };
            let retransmits: Vec<f64> = good
                .iter()
                .filter_map(|s| s.tcp.retransmits.map(|r| r as f64))
                .collect();
            let lost = |f: fn(&PathSample) -> (u32, u32)| {
                good.iter()
                    .map(|s| {
                        let (sent, got) = f(s);
                        sent.saturating_sub(got)
                    })
                    .sum::<u32>()
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} / {} | {} / {} | {} / {} | {} |\n",
                case.label(),
                spread(&pick(|s| s.tcp.mbit_s), 0),
                spread(&retransmits, 0),
                med(|s| s.ping_idle.avg_ms, 2),
                med(|s| s.ping_idle.p99_ms, 2),
                med(|s| s.ping_load.avg_ms, 2),
                med(|s| s.ping_load.p99_ms, 2),
                lost(|s| (s.ping_idle.sent, s.ping_idle.received)),
                lost(|s| (s.ping_load.sent, s.ping_load.received)),
                relay_drops(&good),
            ));
        }
        out.push_str(
            "\nTCP a1 -> b1: median [min-max] over the rounds; ping a1 -> b1: medians of each \
             round's average and p99; lost: summed over the rounds.\n",
        );
    }
    if let Some(rounds) = &results.upgrade {
        out.push_str(
            "\n| relay (UDP) -> direct | rounds | lift -> direct both ways, s | longest ping \
             gap after the lift, ms | longest gap in the second before, ms | pings lost after \
             the lift |\n|---|---|---|---|---|---|\n",
        );
        let good = ok(rounds);
        if good.is_empty() {
            out.push_str(&format!(
                "| upgrade | 0/{} | not measurable: {} | | | |\n",
                rounds.len(),
                why(rounds)
            ));
        } else {
            let pick = |f: fn(&UpgradeSample) -> f64| good.iter().map(|s| f(s)).collect::<Vec<_>>();
            let lost: Vec<String> = good.iter().map(|s| s.lost.to_string()).collect();
            out.push_str(&format!(
                "| upgrade | {}/{} | {} | {} | {} | {} |\n",
                good.len(),
                rounds.len(),
                median_worst(&pick(|s| s.direct_s), 2),
                median_worst(&pick(|s| s.longest_gap_ms), 0),
                median_worst(&pick(|s| s.gap_before_ms), 0),
                lost.join(", "),
            ));
            out.push_str("\nMedian / worst over the rounds; pings lost per round.\n");
        }
    }
    out
}

fn stat(values: &[f64]) -> Value {
    json!({"median": median(values), "worst": worst(values), "best": best(values)})
}

/// The JSON summary: per case the figures over the rounds, every round's sample, and the
/// first line of each error.
pub fn summary(results: &Results, meta: Value) -> Value {
    let mut paths = serde_json::Map::new();
    for (case, rounds) in &results.paths {
        let good = ok(rounds);
        let pick = |f: fn(&PathSample) -> f64| good.iter().map(|s| f(s)).collect::<Vec<_>>();
        let figures = if good.is_empty() {
            json!({"measurable": false, "why": why(rounds)})
        } else {
            json!({
                "measurable": true,
                "joined_s": stat(&pick(|s| s.joined_s)),
                "first_ping_s": stat(&pick(|s| s.first_ping_s)),
                "path_shown_s": stat(&pick(|s| s.settled_s)),
                "path_at_first_ping": first_paths(&good),
                "tcp_mbit_s": stat(&pick(|s| s.tcp.mbit_s)),
                "ping_idle_avg_ms": median(&pick(|s| s.ping_idle.avg_ms)),
                "ping_idle_p99_ms": median(&pick(|s| s.ping_idle.p99_ms)),
                "ping_load_avg_ms": median(&pick(|s| s.ping_load.avg_ms)),
                "ping_load_p99_ms": median(&pick(|s| s.ping_load.p99_ms)),
            })
        };
        paths.insert(
            case.name().to_owned(),
            json!({
                "label": case.label(),
                "rounds": rounds.len(),
                "ok": good.len(),
                "summary": figures,
                "samples": good,
                "errors": errors(rounds),
            }),
        );
    }
    let upgrade = results.upgrade.as_ref().map(|rounds| {
        let good = ok(rounds);
        let pick = |f: fn(&UpgradeSample) -> f64| good.iter().map(|s| f(s)).collect::<Vec<_>>();
        json!({
            "rounds": rounds.len(),
            "ok": good.len(),
            "summary": if good.is_empty() {
                json!({"measurable": false, "why": why(rounds)})
            } else {
                json!({
                    "measurable": true,
                    "lift_to_direct_s": stat(&pick(|s| s.direct_s)),
                    "longest_gap_ms": stat(&pick(|s| s.longest_gap_ms)),
                    "gap_before_ms": stat(&pick(|s| s.gap_before_ms)),
                    "lost": good.iter().map(|s| s.lost).collect::<Vec<_>>(),
                })
            },
            "samples": good,
            "errors": errors(rounds),
        })
    });
    json!({"meta": meta, "paths": paths, "upgrade": upgrade})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spreads() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median_worst(&[0.2, 0.9, 0.3], 1), "0.3 / 0.9");
        assert_eq!(spread(&[200.0, 180.0, 210.0], 0), "200 [180-210]");
        assert_eq!(spread(&[5.0], 1), "5.0");
        assert_eq!(spread(&[], 1), "-");
    }

    #[test]
    fn an_unmeasurable_case_says_why() {
        let results = Results {
            paths: vec![(
                PathCase::RelayTcp,
                vec![Err("the agents did not both join within 20s\nlog...".into())],
            )],
            upgrade: None,
        };
        let t = table(&results);
        assert!(
            t.contains("| 0/1 | not measurable: the agents did not both join within 20s |"),
            "{t}"
        );
        let s = summary(&results, json!({}));
        assert_eq!(s["paths"]["relay-tcp"]["summary"]["measurable"], false);
        assert_eq!(
            s["paths"]["relay-tcp"]["errors"][0],
            "the agents did not both join within 20s"
        );
    }
}

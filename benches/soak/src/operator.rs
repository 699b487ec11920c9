//! The churn: an operator and a fleet misbehaving at random, one action every few tens of
//! milliseconds, for the length of the run. Runs on its own thread (the admin calls block).
//!
//! | action | share | what |
//! |---|---|---|
//! | leave | 22% | a simulated agent closes its connection and comes back after 0.2-5 s |
//! | crash | 8% | a simulated agent dies (answers for nothing) and restarts from its cached map after 0.5-4 s |
//! | failover | 8% | the simulated holder of a workload leaves for 3-6 s (longer than a lease) or crashes |
//! | claim | 15% | a simulated agent claims a workload |
//! | move | 25% | a workload moved (admin API) to a node, simulated or real |
//! | detach | 4% | a workload detached |
//! | revoke | 4% | a simulated node revoked (it joins again as a new node), deleted a little later |
//! | delete | 3% | a simulated node deleted outright (it joins again as a new node) |
//! | recreate | 4% | a workload deleted and created again at the same address, with new standby and allowed lists, attached |
//! | real move | 7% | the real-only workload moved between the real agents |

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use crate::admin::Admin;
use crate::sim::{Command, Slot};

/// One workload the soak manages.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Name.
    pub name: meshlink_api::WorkloadName,
    /// Address (kept across recreations).
    pub address: Ipv4Addr,
}

/// What the operator did, counted by action and outcome.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    /// `action -> outcome -> count`; outcomes are `ok` (the admin API
    /// agreed), `sent` (a command handed to an agent, which ignores it while away), `skipped`
    /// (nothing to act on) or the HTTP status.
    pub actions: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Tally {
    fn count(&mut self, action: &str, outcome: &str) {
        *self
            .actions
            .entry(action.to_string())
            .or_default()
            .entry(outcome.to_string())
            .or_default() += 1;
    }

    fn result<T>(&mut self, action: &str, r: Result<T, crate::admin::AdminError>) {
        match r {
            Ok(_) => self.count(action, "ok"),
            Err(e) => {
                let s = e.status().unwrap_or(0);
                if s == 0 || s >= 500 {
                    tracing::warn!("{action}: {e}");
                }
                self.count(action, &format!("http {s}"));
            }
        }
    }
}

/// The operator.
pub struct Operator {
    /// The admin API.
    pub admin: Admin,
    /// The simulated agents.
    pub slots: Vec<Arc<Slot>>,
    /// The workloads every node may get.
    pub workloads: Vec<Workload>,
    /// The real agents' node names.
    pub real: Vec<String>,
    /// The workload only the real agents hold, if any.
    pub real_workload: Option<Workload>,
    /// Randomness.
    pub rng: StdRng,
    /// Mean pause between two actions.
    pub every: Duration,
    /// Nodes revoked and not deleted yet.
    pub revoked: Vec<String>,
    /// What was done.
    pub tally: Tally,
}

impl Operator {
    /// Acts until `until`.
    pub fn run(&mut self, until: Instant) {
        while Instant::now() < until {
            let pause = self.every.mul_f64(self.rng.gen_range(0.5..1.5));
            std::thread::sleep(pause);
            self.act();
        }
    }

    /// The names of the simulated nodes with a session now.
    fn sim_names(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter_map(|s| {
                let v = s.lock();
                v.session.as_ref().and(v.name.clone())
            })
            .collect()
    }

    fn random_slot(&mut self) -> Arc<Slot> {
        self.slots[self.rng.gen_range(0..self.slots.len())].clone()
    }

    fn random_workload(&mut self) -> Workload {
        self.workloads[self.rng.gen_range(0..self.workloads.len())].clone()
    }

    fn command(&mut self, action: &str, slot: &Slot, cmd: Command) {
        let outcome = if slot.commands.try_send(cmd).is_ok() {
            "sent"
        } else {
            "skipped"
        };
        self.tally.count(action, outcome);
    }

    fn act(&mut self) {
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=21 => {
                let slot = self.random_slot();
                let pause = Duration::from_millis(self.rng.gen_range(200..5_000));
                self.command("leave", &slot, Command::Leave(pause));
            }
            22..=29 => {
                let slot = self.random_slot();
                let pause = Duration::from_millis(self.rng.gen_range(500..4_000));
                self.command("crash", &slot, Command::Crash(pause));
            }
            30..=37 => self.failover(),
            38..=52 => {
                let slot = self.random_slot();
                let w = self.random_workload();
                self.command("claim", &slot, Command::Claim(w.name.to_string()));
            }
            53..=77 => {
                let w = self.random_workload();
                let mut names = self.sim_names();
                names.extend(self.real.iter().cloned());
                let Some(to) = names.choose(&mut self.rng).cloned() else {
                    return self.tally.count("move", "skipped");
                };
                let r = self.admin.move_workload(&w.name, &to);
                self.tally.result("move", r);
            }
            78..=81 => {
                let w = self.random_workload();
                let r = self.admin.detach_workload(&w.name);
                self.tally.result("detach", r);
            }
            82..=85 => {
                // Delete what an earlier revocation left, then revoke another.
                if let Some(name) = self.revoked.pop() {
                    let r = self.admin.delete_node(&name);
                    self.tally.result("delete revoked", r);
                }
                let Some(name) = self.sim_names().choose(&mut self.rng).cloned() else {
                    return self.tally.count("revoke", "skipped");
                };
                let r = self.admin.revoke_node(&name);
                if r.is_ok() {
                    self.revoked.push(name);
                }
                self.tally.result("revoke", r);
            }
            86..=88 => {
                let Some(name) = self.sim_names().choose(&mut self.rng).cloned() else {
                    return self.tally.count("delete", "skipped");
                };
                let r = self.admin.delete_node(&name);
                self.tally.result("delete", r);
            }
            89..=92 => {
                let w = self.random_workload();
                self.recreate(&w);
            }
            _ => self.real_move(),
        }
    }

    /// The simulated holder of a random workload leaves for longer than a lease, or
    /// crashes: the coordinator must fail the workload over to a standby.
    fn failover(&mut self) {
        let w = self.random_workload();
        let now = std::time::Instant::now();
        let holder = self.slots.iter().find(|s| {
            s.lock().session.as_ref().is_some_and(|x| {
                x.holdings()
                    .held(now)
                    .iter()
                    .any(|h| h.address.addr() == std::net::IpAddr::V4(w.address))
            })
        });
        let Some(slot) = holder.cloned() else {
            return self.tally.count("failover", "skipped");
        };
        let pause = Duration::from_millis(self.rng.gen_range(3_000..6_000));
        let cmd = if self.rng.gen_bool(0.5) {
            Command::Leave(pause)
        } else {
            Command::Crash(pause)
        };
        self.command("failover", &slot, cmd);
    }

    /// Deletes `w` and creates it again at its address with fresh lists, attached somewhere.
    pub fn recreate(&mut self, w: &Workload) {
        let r = self.admin.delete_workload(&w.name);
        if r.as_ref().is_err_and(|e| e.status() != Some(404)) {
            return self.tally.result("recreate", r);
        }
        let mut sims = self.sim_names();
        sims.shuffle(&mut self.rng);
        let real = self.real.choose(&mut self.rng).cloned();
        let standby: Vec<String> = sims.iter().take(2).cloned().chain(real).collect();
        let allowed: Vec<String> = sims
            .iter()
            .take(30)
            .cloned()
            .chain(self.real.iter().cloned())
            .collect();
        let to = allowed.choose(&mut self.rng).cloned();
        let r = self
            .admin
            .create_workload(&w.name, w.address, standby, allowed);
        let created = r.is_ok();
        self.tally.result("recreate", r);
        if let (true, Some(to)) = (created, to) {
            let r = self.admin.move_workload(&w.name, &to);
            self.tally.result("attach", r);
        }
    }

    /// Creates the real-only workload, held by the first real agent.
    pub fn create_real_workload(&mut self) {
        let Some(w) = self.real_workload.clone() else {
            return;
        };
        let r = self.admin.delete_workload(&w.name);
        if r.as_ref().is_err_and(|e| e.status() != Some(404)) {
            return self.tally.result("create real", r);
        }
        let r =
            self.admin
                .create_workload(&w.name, w.address, self.real.clone(), self.real.clone());
        self.tally.result("create real", r);
        if let Some(to) = self.real.first().cloned() {
            let r = self.admin.move_workload(&w.name, &to);
            self.tally.result("real move", r);
        }
    }

    fn real_move(&mut self) {
        let (Some(w), Some(to)) = (
            self.real_workload.clone(),
            self.real.choose(&mut self.rng).cloned(),
        ) else {
            return self.tally.count("real move", "skipped");
        };
        let r = self.admin.move_workload(&w.name, &to);
        self.tally.result("real move", r);
    }
}

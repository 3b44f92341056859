//! The scenarios P1–P8, the cluster row, the cross-instance row and their references, run in
//! an order that keeps them apart: the hit paths first, then the cold paths, memory, and
//! overload last.

mod cluster;
mod cold;
mod hits;
mod instances;
mod memory;
mod overload;
mod references;

use crate::lab::Lab;
use crate::report::{Report, Row};
use anyhow::{Result, bail};
use references::References;
use std::time::Duration;

/// Sizes and durations of a run: the full one, or `--quick`, scaled down to finish in under
/// two minutes.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// A scaled-down run; its rows say so.
    pub quick: bool,
    /// How long each `wrk` run lasts.
    pub wrk: Duration,
    /// SNs in P5's batch (10,000 in the target).
    pub p5_sns: usize,
    /// SNs in P7's streamed lookup (100,000 in the target).
    pub p7_sns: usize,
    /// How long P8's overload lasts.
    pub p8: Duration,
    /// `redis-benchmark -n` for MGET.
    pub mget_requests: u64,
    /// `redis-benchmark -n` for GET.
    pub get_requests: u64,
    /// Timed 10,000-SN batches of the cluster row, on each topology.
    pub cluster_batches: usize,
    /// SNs in each of the cross-instance row's three export batches (1,000 in the issue).
    pub instances_batch: usize,
}

impl Scale {
    /// The full run (about two and a half minutes on a quiet 2-core machine).
    pub fn full() -> Self {
        Self {
            quick: false,
            wrk: Duration::from_secs(10),
            p5_sns: 10_000,
            p7_sns: 100_000,
            p8: Duration::from_secs(5),
            mget_requests: 200_000,
            get_requests: 500_000,
            cluster_batches: 20,
            instances_batch: 1_000,
        }
    }

    /// The quick run.
    pub fn quick() -> Self {
        Self {
            quick: true,
            wrk: Duration::from_secs(3),
            p5_sns: 2_560,
            p7_sns: 20_000,
            p8: Duration::from_secs(2),
            mget_requests: 50_000,
            get_requests: 100_000,
            cluster_batches: 5,
            instances_batch: 300,
        }
    }

    /// `label`, marked as scaled down from `full` when this run is quick.
    fn label(&self, label: &str, full: &str) -> String {
        if self.quick {
            format!("{label} (scaled from {full})")
        } else {
            label.to_owned()
        }
    }
}

/// Which of P1–P8, the cluster row and the cross-instance row to run
/// (`--only P1,P3,cluster,instances`; all by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection([bool; GROUPS]);

/// P1–P8, then the cluster row, then the cross-instance row.
const GROUPS: usize = 10;

/// The cluster row's group: its rows print after P8's, and `--only cluster` picks it.
const CLUSTER_GROUP: u8 = 9;

/// The cross-instance row's group: its rows print after the cluster row's, and
/// `--only instances` picks it.
const INSTANCES_GROUP: u8 = 10;

impl Selection {
    /// Every scenario.
    pub fn all() -> Self {
        Self([true; GROUPS])
    }

    /// Parses `P1,P3,cluster,instances` (case-insensitive).
    ///
    /// # Errors
    /// A name that is not P1–P8, `cluster` or `instances`.
    pub fn parse(list: &str) -> Result<Self> {
        let mut chosen = [false; GROUPS];
        for name in list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            let number = name
                .strip_prefix(['P', 'p'])
                .and_then(|number| number.parse::<usize>().ok());
            match number {
                Some(n @ 1..=8) => chosen[n - 1] = true,
                _ if name.eq_ignore_ascii_case("cluster") => {
                    chosen[usize::from(CLUSTER_GROUP) - 1] = true;
                }
                _ if name.eq_ignore_ascii_case("instances") => {
                    chosen[usize::from(INSTANCES_GROUP) - 1] = true;
                }
                _ => bail!("--only: {name:?} is not one of P1–P8, cluster or instances"),
            }
        }
        if !chosen.contains(&true) {
            bail!("--only: no scenario named");
        }
        Ok(Self(chosen))
    }

    fn wants(&self, group: u8) -> bool {
        usize::from(group)
            .checked_sub(1)
            .and_then(|index| self.0.get(index))
            .copied()
            .unwrap_or(false)
    }
}

/// One step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    P1,
    P2,
    P3,
    P4,
    P5,
    Rss,
    P6,
    Stream,
    P8,
    Cluster,
    Instances,
}

/// The steps in the order they run: the hit paths first (nothing else loads the machine),
/// memory after P1–P5 as the target says (before the cluster and cross-instance rows'
/// proxies exist), those two rows while the machine is still quiet, overload last.
const ORDER: [Step; 11] = [
    Step::P1,
    Step::P2,
    Step::P3,
    Step::P4,
    Step::P5,
    Step::Rss,
    Step::Cluster,
    Step::Instances,
    Step::P6,
    Step::Stream,
    Step::P8,
];

impl Step {
    /// The target the step measures (its rows' group).
    fn target(self) -> u8 {
        match self {
            Self::P1 => 1,
            Self::P2 => 2,
            Self::P3 => 3,
            Self::P4 => 4,
            Self::P5 => 5,
            Self::P6 => 6,
            Self::Rss | Self::Stream => 7,
            Self::P8 => 8,
            Self::Cluster => CLUSTER_GROUP,
            Self::Instances => INSTANCES_GROUP,
        }
    }

    /// The name of a failed step's row.
    fn name(self) -> String {
        match self {
            Self::Cluster => "Cluster".to_owned(),
            Self::Instances => "Instances".to_owned(),
            other => format!("P{}", other.target()),
        }
    }

    /// What the step does, for the progress lines.
    fn title(self) -> &'static str {
        match self {
            Self::P1 => "P1: batches of 100 hits, Redis only",
            Self::P2 => "P2: batches of 100 hits, local tier",
            Self::P3 => "P3: single-SN hits",
            Self::P4 => "P4: 100 cold SNs",
            Self::P5 => "P5: one wide cold batch",
            Self::Rss => "P7: memory after P1–P5",
            Self::P6 => "P6: 1,000 concurrent GETs of one cold SN",
            Self::Stream => "P7: a huge streamed lookup",
            Self::P8 => "P8: overload",
            Self::Cluster => "Cluster: 100- and 10,000-SN hits, 3-master cluster vs one node",
            Self::Instances => {
                "Instances: an overlapping cold export and a stampede over three proxies"
            }
        }
    }

    async fn run(
        self,
        lab: &mut Lab,
        refs: &mut References,
        report: &mut Report,
    ) -> Result<Vec<Row>> {
        match self {
            Self::P1 => hits::p1(lab, refs, report).await,
            Self::P2 => hits::p2(lab, refs, report).await,
            Self::P3 => hits::p3(lab, refs, report).await,
            Self::P4 => cold::p4(lab, report).await,
            Self::P5 => cold::p5(lab, report).await,
            Self::Rss => Ok(memory::rss(lab)),
            Self::P6 => cold::p6(lab).await,
            Self::Stream => memory::stream(lab).await,
            Self::P8 => overload::p8(lab, report).await,
            Self::Cluster => cluster::cluster(lab, report).await,
            Self::Instances => instances::instances(lab, report).await,
        }
    }
}

/// Runs the selected scenarios, adding their rows to `report`. A scenario that fails is a
/// failed row with the error in the notes; the run goes on.
pub async fn run(lab: &mut Lab, only: Selection, report: &mut Report) {
    let mut refs = References::default();
    for step in ORDER {
        if only.wants(step.target()) {
            eprintln!("bench: {}", step.title());
            let rows = step.run(lab, &mut refs, report).await;
            record(report, step, rows);
        }
    }
}

fn record(report: &mut Report, step: Step, rows: Result<Vec<Row>>) {
    match rows {
        Ok(rows) => rows.into_iter().for_each(|row| report.push(row)),
        Err(err) => report.error(
            Row::new(step.target(), step.name(), "see PERFORMANCE.md"),
            &err,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_picks_targets_and_the_cluster_row_by_name() {
        let chosen = Selection::parse("p1, Cluster,P8").unwrap();
        assert!(chosen.wants(1) && chosen.wants(8) && chosen.wants(CLUSTER_GROUP));
        assert!(!chosen.wants(2));
        assert!(!Selection::parse("P1").unwrap().wants(CLUSTER_GROUP));
        assert!(Selection::all().wants(CLUSTER_GROUP));
        assert!(Selection::parse("P9").is_err());
        assert!(Selection::parse("clusters").is_err());
        assert!(Selection::parse(" , ").is_err());
    }

    #[test]
    fn only_picks_the_cross_instance_row_by_name() {
        let chosen = Selection::parse("Instances").unwrap();
        assert!(chosen.wants(INSTANCES_GROUP));
        assert!(!chosen.wants(CLUSTER_GROUP) && !chosen.wants(6));
        assert!(!Selection::parse("cluster").unwrap().wants(INSTANCES_GROUP));
        assert!(Selection::all().wants(INSTANCES_GROUP));
        assert!(Selection::parse("instance").is_err());
    }

    #[test]
    fn the_cross_instance_row_runs_after_the_memory_rows_and_before_the_loads() {
        let at = |wanted: Step| ORDER.iter().position(|&step| step == wanted);
        assert!(at(Step::Rss) < at(Step::Instances));
        assert!(at(Step::Instances) < at(Step::P6));
        assert_eq!(Step::Instances.name(), "Instances");
        assert_eq!(Step::Instances.target(), INSTANCES_GROUP);
    }

    #[test]
    fn the_cluster_row_runs_after_the_memory_rows_and_before_the_loads() {
        let at = |wanted: Step| ORDER.iter().position(|&step| step == wanted);
        assert!(at(Step::Rss) < at(Step::Cluster));
        assert!(at(Step::Cluster) < at(Step::P6));
        assert_eq!(Step::Cluster.name(), "Cluster");
        assert_eq!(Step::P5.name(), "P5");
    }
}

//! Running debootstrap and turning its hundreds of output lines into a few progress lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::RootfsError;
use super::spec::{RootfsSpec, SUITE, VARIANT};

/// Lines of debootstrap's output an error quotes.
const TAIL_LINES: usize = 25;
/// A phase that runs this long without changing gets a "so far" line.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// PATH for debootstrap and the tools it runs in the new tree (chroot, dpkg, mount).
pub const TOOL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `debootstrap --variant=minbase [--include=...] bookworm ROOT MIRROR`, reporting
/// progress; on failure the error quotes the end of its output.
pub fn run(
    debootstrap: &Path,
    spec: &RootfsSpec,
    root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RootfsError> {
    let mut cmd = Command::new(debootstrap);
    cmd.arg(format!("--variant={VARIANT}"));
    cmd.args(spec.include_arg());
    cmd.arg(SUITE).arg(root).arg(&spec.mirror);
    cmd.env("PATH", TOOL_PATH)
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    let (reader, writer) = std::io::pipe().map_err(RootfsError::io("create a pipe for", root))?;
    let writer2 = writer
        .try_clone()
        .map_err(RootfsError::io("create a pipe for", root))?;
    cmd.stdout(writer)
        .stderr(writer2)
        .stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().map_err(|source| RootfsError::Spawn {
        tool: debootstrap.display().to_string(),
        source,
    })?;
    drop(cmd); // closes our copies of the pipe's write end, so reading ends with the child
    let mut summary = Summary::new(Instant::now());
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if let Some(shown) = summary.line(&line, Instant::now()) {
            progress(&shown);
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .map_err(RootfsError::io("wait for debootstrap building", root))?;
    if let Some(done) = summary.finish() {
        progress(&done);
    }
    if !status.success() {
        return Err(RootfsError::Debootstrap {
            status,
            tail: Vec::from(tail).join("\n"),
        });
    }
    Ok(())
}

/// Folds debootstrap's per-package lines ("I: Retrieving libc6 2.36-9...") into one line per
/// phase plus a heartbeat; other info lines, warnings and errors are shown as they come.
#[derive(Debug)]
pub struct Summary {
    phase: Option<&'static Phase>,
    count: u32,
    last_shown: Instant,
}

/// A phase of debootstrap: its per-item verbs (it alternates "Retrieving X" and "Validating
/// X" while downloading), the first of which is counted.
#[derive(Debug)]
struct Phase {
    label: &'static str,
    verbs: &'static [&'static str],
    unit: &'static str,
}

const PHASES: &[Phase] = &[
    Phase {
        label: "downloading",
        verbs: &["Retrieving", "Validating"],
        unit: "files",
    },
    Phase {
        label: "extracting",
        verbs: &["Extracting"],
        unit: "packages",
    },
    Phase {
        label: "unpacking",
        verbs: &["Unpacking"],
        unit: "packages",
    },
    Phase {
        label: "configuring",
        verbs: &["Configuring"],
        unit: "packages",
    },
];

impl Summary {
    pub fn new(now: Instant) -> Self {
        Self {
            phase: None,
            count: 0,
            last_shown: now,
        }
    }

    /// The progress line(s) to show for one output line, if any.
    pub fn line(&mut self, line: &str, now: Instant) -> Option<String> {
        let Some(info) = line.strip_prefix("I: ") else {
            // Warnings and errors always; dpkg's chatter never.
            let loud = line.starts_with("W: ") || line.starts_with("E: ");
            return loud.then(|| format!("debootstrap: {line}"));
        };
        let verb = info.split_whitespace().next().unwrap_or("");
        let item = info[verb.len()..].trim().trim_end_matches('.');
        if let Some(phase) = PHASES.iter().find(|p| p.verbs.contains(&verb)) {
            let counted = phase.verbs[0] == verb;
            if self.phase.is_some_and(|p| std::ptr::eq(p, phase)) {
                self.count += u32::from(counted);
                if now.duration_since(self.last_shown) < HEARTBEAT {
                    return None;
                }
                self.last_shown = now;
                return Some(format!(
                    "debootstrap: {} ... {} {} so far ({item})",
                    phase.label, self.count, phase.unit
                ));
            }
            let done = self.finish();
            self.phase = Some(phase);
            self.count = u32::from(counted);
            self.last_shown = now;
            let start = format!("debootstrap: {} ...", phase.label);
            return Some(match done {
                Some(done) => format!("{done}\n{start}"),
                None => start,
            });
        }
        let done = self.finish();
        let shown = format!("debootstrap: {}", info.trim_end_matches("..."));
        Some(match done {
            Some(done) => format!("{done}\n{shown}"),
            None => shown,
        })
    }

    /// Closes the current phase: its line with the count.
    pub fn finish(&mut self) -> Option<String> {
        let phase = self.phase.take()?;
        Some(format!(
            "debootstrap: {} done ({} {})",
            phase.label, self.count, phase.unit
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn per_package_lines_fold_into_phases() {
        let t0 = Instant::now();
        let mut s = Summary::new(t0);
        let mut shown = Vec::new();
        let mut feed = |s: &mut Summary, line: &str, secs: u64| {
            if let Some(l) = s.line(line, t0 + Duration::from_secs(secs)) {
                shown.extend(l.lines().map(str::to_owned));
            }
        };
        feed(&mut s, "I: Checking Release signature", 0);
        for (i, pkg) in ["adduser", "apt", "bash"].iter().enumerate() {
            feed(&mut s, &format!("I: Retrieving {pkg} 1.0"), i as u64);
            feed(&mut s, &format!("I: Validating {pkg} 1.0"), i as u64);
        }
        feed(&mut s, "I: Retrieving zlib1g 1:1.2", 12); // a heartbeat after 10 s
        feed(&mut s, "dpkg: chatter that is not shown", 12);
        feed(&mut s, "W: Failure trying to run: chroot", 13);
        feed(&mut s, "I: Extracting adduser...", 13);
        feed(&mut s, "I: Base system installed successfully.", 14);
        assert_eq!(
            shown,
            [
                "debootstrap: Checking Release signature",
                "debootstrap: downloading ...",
                "debootstrap: downloading ... 4 files so far (zlib1g 1:1.2)",
                "debootstrap: W: Failure trying to run: chroot",
                "debootstrap: downloading done (4 files)",
                "debootstrap: extracting ...",
                "debootstrap: extracting done (1 packages)",
                "debootstrap: Base system installed successfully.",
            ]
        );
        assert_eq!(s.finish(), None);
    }
}

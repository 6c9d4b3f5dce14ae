//! How a task ended, in the one vocabulary used everywhere (CLI, JSON, status, results).
//!
//! | reason | meaning |
//! |---|---|
//! | `exit: N` | the guest exited with non-zero status N |
//! | `trap: <what>` | the guest trapped (`trap: unreachable`, `trap: stack overflow`, …) |
//! | `invalid: <why>` | refused before running (`invalid: unknown import env::launch_missiles`) |
//! | `limit: <which>` | a hard limit ended the task (`limit: memory`, `limit: time`, …) |
//! | `cancelled` | the job was cancelled |
//! | `lost` | no result after every retry |

use serde::{Deserialize, Serialize};
use std::fmt;

/// The hard limits a task can run into. Their names are part of the CLI contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Limit {
    Memory,
    Table,
    Time,
    Output,
    Files,
    OpenFiles,
    GpuMemory,
    GpuObjects,
    GpuDispatch,
    GpuTime,
}

impl Limit {
    /// The name used after `limit: `.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Memory => "memory",
            Limit::Table => "table",
            Limit::Time => "time",
            Limit::Output => "output",
            Limit::Files => "files",
            Limit::OpenFiles => "open-files",
            Limit::GpuMemory => "gpu-memory",
            Limit::GpuObjects => "gpu-objects",
            Limit::GpuDispatch => "gpu-dispatch",
            Limit::GpuTime => "gpu-time",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a task did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// The guest exited with a non-zero status.
    Exit(i32),
    /// The guest trapped; the text says what (`unreachable`, `stack overflow`, …).
    Trap(String),
    /// Refused before running; the text says why, in one line.
    Invalid(String),
    /// A hard limit ended the task.
    Limit(Limit),
    Cancelled,
    Lost,
}

impl Reason {
    /// The reason without its free text — `exit`, `trap`, `invalid`, `limit: memory`,
    /// `cancelled`, `lost` — few enough values to label metrics with.
    pub fn kind(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Reason::Exit(_) => "exit".into(),
            Reason::Trap(_) => "trap".into(),
            Reason::Invalid(_) => "invalid".into(),
            Reason::Limit(limit) => format!("limit: {limit}").into(),
            Reason::Cancelled => "cancelled".into(),
            Reason::Lost => "lost".into(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Exit(code) => write!(f, "exit: {code}"),
            Reason::Trap(what) => write!(f, "trap: {what}"),
            Reason::Invalid(why) => write!(f, "invalid: {why}"),
            Reason::Limit(limit) => write!(f, "limit: {limit}"),
            Reason::Cancelled => f.write_str("cancelled"),
            Reason::Lost => f.write_str("lost"),
        }
    }
}

/// The status of one finished task run, as `grid run --json` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Succeeded,
    Failed,
    /// Refused before running (the reason is `invalid: …`).
    Refused,
}

/// How one run of a task ended: success, or a [`Reason`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    Failed(Reason),
}

impl Outcome {
    pub fn status(&self) -> TaskStatus {
        match self {
            Outcome::Succeeded => TaskStatus::Succeeded,
            Outcome::Failed(Reason::Invalid(_)) => TaskStatus::Refused,
            Outcome::Failed(_) => TaskStatus::Failed,
        }
    }

    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Outcome::Succeeded => None,
            Outcome::Failed(reason) => Some(reason),
        }
    }

    /// The guest's exit code: 0 on success, N for `exit: N`, none when it never exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Succeeded => Some(0),
            Outcome::Failed(Reason::Exit(code)) => Some(*code),
            Outcome::Failed(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_spelled_as_the_cli_contract_says() {
        assert_eq!(Reason::Exit(3).to_string(), "exit: 3");
        assert_eq!(
            Reason::Trap("unreachable".into()).to_string(),
            "trap: unreachable"
        );
        assert_eq!(
            Reason::Limit(Limit::OpenFiles).to_string(),
            "limit: open-files"
        );
        assert_eq!(
            Reason::Invalid("unknown import env::f".into()).to_string(),
            "invalid: unknown import env::f"
        );
        assert_eq!(
            Outcome::Failed(Reason::Invalid("x".into())).status(),
            TaskStatus::Refused
        );
    }
}

//! The `wire` target: every message type's `decode` against random and mangled bytes.

use crate::Verdict;
use grid_proto::{
    Answer, CancelRequest, JobRecord, Limit, Message, NodeInfo, NodeTally, Outcome, OutputFile,
    Reason, ResultMsg, Sha256Hex, SubmitRequest, TaskMsg, TaskRecord, Usage, UsageEntry, decode,
    encode,
};
use serde::{Serialize, de::DeserializeOwned};

/// Valid messages to mangle: a mangled valid message reaches deeper than random bytes, which
/// mostly fail at the envelope.
fn samples() -> Vec<Vec<u8>> {
    let sha = Sha256Hex::of(b"sample");
    let result = ResultMsg {
        tenant: "default".into(),
        job_id: "01a22a5421bc66264d".into(),
        index: 7,
        attempt: 1,
        replica: 0,
        node_id: "node-0".into(),
        outcome: Outcome::Failed(Reason::Limit(Limit::Memory)),
        digest: sha,
        usage: Usage {
            cpu_seconds: 0.5,
            wall_seconds: 0.6,
            gpu_seconds: 0.0,
            peak_memory_bytes: 1 << 20,
            bytes_in: 12,
            bytes_out: 3,
        },
        files: vec![OutputFile {
            path: "a/b.csv".into(),
            bytes: 3,
            sha256: sha,
        }],
        stdout: Some(sha),
        stderr: None,
        logs_truncated: true,
        detail: None,
        seal: grid_proto::Seal {
            first_index: 7,
            count: 1,
            sent_unix_ms: 1_700_000_000_000,
            handed_unix_ms: 1_700_000_000_500,
            mac: [9; 32],
        },
        staged: vec![
            grid_proto::Staged {
                sha256: sha,
                bytes: 3,
                chunks: vec![4],
                inline: Vec::new(),
            },
            grid_proto::Staged::inline(b"out".to_vec()),
        ],
    };
    vec![
        encode(&TaskMsg {
            job_id: "01a22a5421bc66264d".into(),
            index: 3,
            count: 2,
            attempt: 0,
            replica: 2,
            params: vec![br#"{"rows": 10}"#.to_vec(), br#"{"rows": 11}"#.to_vec()],
            input: None,
            spec: grid_proto::JobSpec {
                tenant: "default".into(),
                class: "cpu".into(),
                module_sha256: sha,
                module_name: "job.wasm".into(),
                args: vec!["--rows".into()],
                env: vec![("K".into(), "V".into())],
                limits: grid_proto::JobLimits {
                    memory_bytes: 1 << 29,
                    timeout_ms: 600_000,
                    max_output_bytes: 1 << 30,
                    gpu_memory_bytes: 0,
                    gpu_time_ms: 0,
                },
                seed: 1,
                retries: 2,
                replicas: 1,
                quorum: 1,
                tasks: grid_proto::TaskSource::Count(10),
                shared: vec![],
                program: None,
                priority: 0,
                name: String::new(),
            },
            seal: result.seal,
        }),
        encode(&result),
        encode(&grid_proto::TakeRequest {
            class: "cpu".into(),
            max: 8,
        }),
        encode(&grid_proto::DeliveryReport {
            done: vec![1, 2],
            back: vec![3],
            back_delay_ms: 1000,
            holding: vec![4, 5, 6],
            running: vec![4],
        }),
        encode(&grid_proto::FetchRequest {
            delivery: 7,
            sha256: sha,
            after_seq: 12,
        }),
        encode(&Answer::Granted(grid_proto::Fetched {
            size: 3,
            chunks: 1,
            data: vec![b"abc".to_vec()],
            last_seq: 13,
        })),
        encode(&Answer::Granted(grid_proto::Deliveries {
            deliveries: vec![grid_proto::Delivery {
                id: 1,
                delivered: 1,
                published_unix_ms: 1,
                task: vec![1, 2, 3],
            }],
        })),
        encode(&CancelRequest { job_id: "j".into() }),
        encode(&grid_proto::ResultsMsg {
            results: vec![result.clone(), result.clone()],
        }),
        encode(&Answer::<grid_proto::JobRef>::Refused("no".into())),
        encode(&Answer::Granted(grid_proto::Retrying {
            job_id: "01".into(),
            tasks: 3,
        })),
        encode(&NodeTally {
            agreed: 3,
            outvoted: 1,
        }),
        encode(&UsageEntry {
            tenant: "default".into(),
            job_id: "j".into(),
            index: 1,
            attempt: 0,
            replica: 0,
            node_id: "n".into(),
            usage: result.usage.clone(),
            recorded_unix_ms: 1,
            replicas: 3,
            digest: sha,
            round: 1,
        }),
        encode(&NodeInfo {
            id: "n".into(),
            classes: vec!["cpu".into(), "gpu".into()],
            gpu: Some("llvmpipe".into()),
            slots: 2,
            gpu_slots: 1,
            busy: 1,
            running: 1,
            memory_reserved_bytes: 1 << 20,
            memory_budget_bytes: 1 << 30,
            tasks_done: 9,
            started_unix_ms: 1,
            preparing: None,
            runtimes_ready: Vec::new(),
            accepts: grid_proto::JobLimits::default(),
        }),
    ]
}

/// Decodes `bytes` as `T`; what decodes must survive a round trip unchanged.
fn check<T: Message + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    decoded: &mut u32,
) -> Result<(), String> {
    if let Ok(value) = decode::<T>(bytes) {
        *decoded += 1;
        let again = decode::<T>(&encode(&value))
            .map_err(|e| format!("{} did not decode after re-encoding: {e}", T::KIND))?;
        if again != value {
            return Err(format!("{} changed in a round trip: {value:?}", T::KIND));
        }
    }
    Ok(())
}

/// The first byte picks raw bytes or a sample to mangle; the rest are the bytes, or a count
/// (0–5) of changes and pairs of (position, value) to write into the sample (a lone last byte
/// cuts it there instead).
pub fn case(input: &[u8]) -> Verdict {
    let bytes = match input.split_first() {
        Some((pick, rest)) if pick % 2 == 1 => {
            let samples = samples();
            let mut bytes = samples[usize::from(pick / 2) % samples.len()].clone();
            // A few changes, so that most mangled messages still get past the envelope.
            let changes = rest.first().map_or(0, |n| usize::from(n % 6));
            for pair in rest.get(1..).unwrap_or_default().chunks(2).take(changes) {
                match pair {
                    [at, value] if !bytes.is_empty() => {
                        let at = usize::from(*at) % (bytes.len() + 1);
                        if at == bytes.len() {
                            bytes.push(*value);
                        } else {
                            bytes[at] = *value;
                        }
                    }
                    [cut] => bytes.truncate(usize::from(*cut) % (bytes.len() + 1)),
                    _ => {}
                }
            }
            bytes
        }
        _ => input.to_vec(),
    };
    let mut decoded = 0;
    check::<TaskMsg>(&bytes, &mut decoded)?;
    check::<ResultMsg>(&bytes, &mut decoded)?;
    check::<grid_proto::ResultsMsg>(&bytes, &mut decoded)?;
    check::<CancelRequest>(&bytes, &mut decoded)?;
    check::<grid_proto::OwnerRequest>(&bytes, &mut decoded)?;
    check::<grid_proto::StorageRequest>(&bytes, &mut decoded)?;
    check::<grid_proto::DeleteRequest>(&bytes, &mut decoded)?;
    check::<grid_proto::RetryRequest>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::JobRef>>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::Deleted>>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::Retrying>>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::StoreReady>>(&bytes, &mut decoded)?;
    check::<NodeTally>(&bytes, &mut decoded)?;
    check::<UsageEntry>(&bytes, &mut decoded)?;
    check::<NodeInfo>(&bytes, &mut decoded)?;
    check::<JobRecord>(&bytes, &mut decoded)?;
    check::<TaskRecord>(&bytes, &mut decoded)?;
    // What providers send the broker, and what it answers.
    check::<grid_proto::StageRequest>(&bytes, &mut decoded)?;
    check::<grid_proto::TakeRequest>(&bytes, &mut decoded)?;
    check::<grid_proto::DeliveryReport>(&bytes, &mut decoded)?;
    check::<grid_proto::FetchRequest>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::Deliveries>>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::Reported>>(&bytes, &mut decoded)?;
    check::<Answer<grid_proto::Fetched>>(&bytes, &mut decoded)?;
    // No `PartialEq`: decoding alone must not panic.
    if decode::<SubmitRequest>(&bytes).is_ok() {
        decoded += 1;
    }
    Ok(if decoded > 0 { "decoded" } else { "refused" }.into())
}

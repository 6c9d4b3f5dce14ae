//! Seals: the broker's proof that it sent a task message (see [`grid_proto::Seal`]).
//!
//! A provider writes every field of a result. Without a seal, one that knows a job id could
//! report any of its tasks, and bill any attempt number the job allows. The broker seals each
//! task message it publishes with an HMAC-SHA256 under a key kept in `grid_secrets`, which
//! only the operator's credentials can read; the node copies the seal into each result, and
//! [`super::Rules::admit`] accepts a result only under a seal the broker made for its tenant,
//! job, attempt and replica, whose run holds its task. A seal also says when the message was
//! handed to its node, by the broker's own clock, so the ledger bills no more time than passed
//! between then and the result ([`super::ledger::bound_by_elapsed`]).
//!
//! The broker hands each message to one node (`shell::dispatch`), and binds the seal to that
//! node as it does ([`SealKey::bind`]): a result is accepted only from the node the message was
//! handed to. What a seal cannot stop is that node telling another identity what to report —
//! collusion between identities, which only replicas on independent identities answer.

use super::Dispatch;
use grid_proto::{ResultMsg, Seal};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The broker's sealing key (32 random bytes, made once per grid and kept in JetStream so
/// that a restarted broker checks the seals its predecessor made).
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl SealKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The seal of `dispatch`, a message of `tenant`'s job, sent at `sent_unix_ms`.
    pub fn seal(&self, tenant: &str, dispatch: &Dispatch, sent_unix_ms: u64) -> Seal {
        let mut seal = Seal {
            first_index: dispatch.index,
            count: dispatch.count,
            sent_unix_ms,
            handed_unix_ms: 0,
            mac: [0; 32],
        };
        seal.mac = self
            .mac(
                tenant,
                &dispatch.job_id,
                dispatch.attempt,
                dispatch.replica,
                &seal,
            )
            .finalize()
            .into_bytes()
            .into();
        seal
    }

    /// `seal` bound to `node`, the one node its message is handed to, at `handed_unix_ms`.
    pub fn bind(&self, seal: &Seal, node: &str, handed_unix_ms: u64) -> Seal {
        Seal {
            mac: self
                .bound(&seal.mac, node, handed_unix_ms)
                .finalize()
                .into_bytes()
                .into(),
            handed_unix_ms,
            ..*seal
        }
    }

    /// Why `result`'s seal is not one this key made for its task and bound to its node, if it
    /// is not.
    pub fn check(&self, result: &ResultMsg) -> Result<(), String> {
        self.check_task(
            &result.tenant,
            &result.job_id,
            result.index,
            result.attempt,
            result.replica,
            &result.node_id,
            &result.seal,
        )
    }

    /// Why `seal` is not one this key made for a message that sent task `index` of `tenant`'s
    /// job `job` as this attempt and replica, handed to `node`, if it is not.
    #[allow(clippy::too_many_arguments)]
    pub fn check_task(
        &self,
        tenant: &str,
        job: &str,
        index: u64,
        attempt: u32,
        replica: u32,
        node: &str,
        seal: &Seal,
    ) -> Result<(), String> {
        let sealed = seal.first_index..seal.first_index.saturating_add(u64::from(seal.count));
        let unbound: [u8; 32] = self
            .mac(tenant, job, attempt, replica, seal)
            .finalize()
            .into_bytes()
            .into();
        self.bound(&unbound, node, seal.handed_unix_ms)
            .verify_slice(&seal.mac)
            .map_err(|_| {
                format!("its seal is not the broker's for a task handed to node {node}")
            })?;
        if !sealed.contains(&index) {
            return Err(format!(
                "its seal is for tasks {}..{}, not {index}",
                sealed.start, sealed.end
            ));
        }
        Ok(())
    }

    fn bound(&self, unbound: &[u8; 32], node: &str, handed_unix_ms: u64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(b"grid-seal-node-v1");
        mac.update(unbound);
        mac.update(&(node.len() as u64).to_le_bytes());
        mac.update(node.as_bytes());
        mac.update(&handed_unix_ms.to_le_bytes());
        mac
    }

    fn mac(
        &self,
        tenant: &str,
        job: &str,
        attempt: u32,
        replica: u32,
        seal: &Seal,
    ) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        // Each field with its length or at a fixed width: no two messages give the same input.
        mac.update(b"grid-seal-v1");
        for text in [tenant, job] {
            mac.update(&(text.len() as u64).to_le_bytes());
            mac.update(text.as_bytes());
        }
        mac.update(&attempt.to_le_bytes());
        mac.update(&replica.to_le_bytes());
        mac.update(&seal.first_index.to_le_bytes());
        mac.update(&seal.count.to_le_bytes());
        mac.update(&seal.sent_unix_ms.to_le_bytes());
        mac
    }
}

//! Who may do what on a grid, enforced by the NATS server itself.
//!
//! Grid uses NATS's decentralized JWT auth rather than a scheme of its own: an *operator* key
//! signs one *account* (`grid`, with JetStream) and a system account; the account key signs one
//! *user* per identity, and each user JWT carries that identity's subject permissions. The
//! server checks every publish and subscribe against them; the broker checks what it is asked
//! on top (a tenant's submit names the tenant of the subject it came on, a result the node id
//! of its subject).
//!
//! | role | may |
//! |---|---|
//! | `operator` (the broker, `grid up`) | everything |
//! | `tenant` | ask the broker (`grid.api.<tenant>.>`); hear its own jobs' changes (`grid.events.<tenant>.>`); read its own job and task records (keys `<tenant>.…`) and its own ledger entries; read and write its own object store (`grid_store_<tenant>`); read node heartbeats and tallies |
//! | `provider` | ask the broker (`grid.provider.<node>.>`) for tasks, report them done or handed back, read the objects the tasks it holds need, ask for its stage and for replica claims — it never touches the work queue, its acks or a tenant's store itself; publish results and heartbeats under its own node id only; write its own stage (`GRID_STAGE_<node>`: outputs and logs for the broker to check and copy) and nothing else in JetStream's stores; hear cancels |
//!
//! What a provider can *not* do: submit, cancel or delete jobs; read job records, task records,
//! votes, claims, tallies, the ledger or the broker's secrets; publish a result or a heartbeat
//! as another node; write, roll up, purge or delete anything in a tenant's store, a bucket or a
//! stream but its own stage and heartbeat (neither allows rollups; only the operator may purge).
//! What it reads of tenants' stores, it reads through the broker, which serves only the objects
//! named by a task message the node holds at that moment.
//!
//! Every user gets its own inbox prefix (`_INBOX_<role>_<name>`) and may subscribe to nothing
//! else (a provider also hears `grid.cancel.>`), so nobody reads another's replies.
//!
//! Adding a tenant or a provider needs no change on the server: its credentials are signed by
//! the account key that the server already trusts. The server's side is one config file,
//! [`AuthDir::server_config`], included by `nats-server -c`.

use anyhow::{Context, Result, anyhow, bail};
use grid_proto::names;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

/// What a set of credentials may do; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Operator,
    Tenant,
    Provider,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Tenant => "tenant",
            Role::Provider => "provider",
        }
    }
    fn from_tag(tag: &str) -> Option<Self> {
        match tag.strip_prefix("grid-role:")? {
            "operator" => Some(Role::Operator),
            "tenant" => Some(Role::Tenant),
            "provider" => Some(Role::Provider),
            _ => None,
        }
    }
}

/// The text of the credentials file at `path`, or an error that names it.
pub fn read_creds(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading credentials {}", path.display()))
}

/// Who a credentials file speaks for: read from its user JWT (the server checks the JWT's
/// signature, so a file whose claims were edited does not connect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// The reply-subject prefix this identity's permissions allow.
    pub fn inbox_prefix(&self) -> String {
        match self.role {
            Role::Operator => "_INBOX".into(),
            Role::Tenant => format!("_INBOX_t_{}", self.name),
            Role::Provider => format!("_INBOX_p_{}", self.name),
        }
    }

    /// The identity in the credentials file at `path`.
    pub fn of_creds_file(path: &Path) -> Result<Self> {
        Self::of_creds(&read_creds(path)?)
            .with_context(|| format!("credentials {}", path.display()))
    }

    pub fn of_creds(text: &str) -> Result<Self> {
        let jwt = text
            .lines()
            .skip_while(|l| !l.contains("BEGIN NATS USER JWT"))
            .nth(1)
            .map(str::trim)
            .ok_or_else(|| anyhow!("no user JWT in it"))?;
        let claims = jwt
            .split('.')
            .nth(1)
            .ok_or_else(|| anyhow!("the user JWT is malformed"))?;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64_url_decode(claims).ok_or_else(|| anyhow!("the user JWT is malformed"))?,
        )
        .map_err(|e| anyhow!("the user JWT is malformed: {e}"))?;
        let name = claims["name"].as_str().unwrap_or_default().to_string();
        let role = claims["nats"]["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .find_map(Role::from_tag)
            .ok_or_else(|| anyhow!("not a grid user (no grid-role tag): make one with `grid tenant add` or `grid provider add`"))?;
        Ok(Self { role, name })
    }
}

/// The credentials file to use: `flag`, else `GRID_CREDS`, else the default tenant's of a
/// `grid up` in the default data dir, when there is one (so the quick start needs no flag).
pub fn creds_path(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("GRID_CREDS")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            let path =
                AuthDir::new(default_data_dir().join("auth")).tenant_creds(names::DEFAULT_TENANT);
            path.is_file().then_some(path)
        })
}

/// Where `grid up` keeps its data when not told: `$XDG_DATA_HOME/grid` or `~/.local/share/grid`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir)
        .join("grid")
}

/// An operator's keys and what they signed, in one directory:
/// `operator.nk`, `account.nk`, `system.nk` (seeds — keep them secret), `server.conf` (for
/// `nats-server -c`), and `creds/<role>-<name>.creds` for each identity made.
pub struct AuthDir {
    dir: PathBuf,
}

impl AuthDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the keys, the server config and the broker's credentials unless they exist;
    /// keeps what is there (credentials already handed out stay valid).
    pub fn init(&self) -> Result<()> {
        let creds = self.dir.join("creds");
        std::fs::create_dir_all(&creds).with_context(|| format!("creating {}", creds.display()))?;
        restrict(&self.dir)?;
        let operator = self.key("operator", nkeys::KeyPair::new_operator)?;
        let account = self.key("account", nkeys::KeyPair::new_account)?;
        let system = self.key("system", nkeys::KeyPair::new_account)?;
        let operator_jwt = sign(
            &operator,
            &json!({
                "name": "grid",
                "sub": operator.public_key(),
                "nats": {"system_account": system.public_key(), "type": "operator", "version": 2},
            }),
        )?;
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        let mut grid_limits = unlimited.clone();
        for (k, v) in [
            ("mem_storage", -1),
            ("disk_storage", -1),
            ("streams", -1),
            ("consumer", -1),
            ("max_ack_pending", -1),
            ("mem_max_stream_bytes", -1),
            ("disk_max_stream_bytes", -1),
        ] {
            grid_limits[k] = json!(v);
        }
        let account_jwt = sign(
            &operator,
            &json!({
                "name": "grid",
                "sub": account.public_key(),
                "nats": {"limits": grid_limits, "default_permissions": {"pub": {}, "sub": {}},
                         "type": "account", "version": 2},
            }),
        )?;
        let system_jwt = sign(
            &operator,
            &json!({
                "name": "system",
                "sub": system.public_key(),
                "nats": {"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}},
                         "type": "account", "version": 2},
            }),
        )?;
        let config = format!(
            "# Grid's operator setup, made by `grid auth init`; include it with nats-server -c.\n\
             operator: {operator_jwt}\n\
             system_account: {system}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {account}: {account_jwt}\n  {system}: {system_jwt}\n}}\n\
             # Lets JetStream's API cross the leaf-node links of provider sites (`grid site init`):\n\
             # nats-server denies it on a non-system account's leaf link unless the account is\n\
             # mapped to the default domain on both ends.\n\
             default_js_domain: {{ {account}: \"\" }}\n",
            system = system.public_key(),
            account = account.public_key(),
        );
        write_private(&self.server_config(), config.as_bytes())?;
        if !self.operator_creds().is_file() {
            self.issue(Role::Operator, "broker")?;
        }
        Ok(())
    }

    /// The nats-server config of this operator setup.
    pub fn server_config(&self) -> PathBuf {
        self.dir.join("server.conf")
    }

    /// The credentials of the broker (and of `grid up` itself): the operator role.
    pub fn operator_creds(&self) -> PathBuf {
        self.creds(Role::Operator, "broker")
    }

    pub fn tenant_creds(&self, name: &str) -> PathBuf {
        self.creds(Role::Tenant, name)
    }

    pub fn provider_creds(&self, name: &str) -> PathBuf {
        self.creds(Role::Provider, name)
    }

    fn creds(&self, role: Role, name: &str) -> PathBuf {
        self.dir
            .join("creds")
            .join(format!("{}-{name}.creds", role.as_str()))
    }

    /// Signs a new user for `name` in `role` and writes its credentials file; returns its path.
    /// Issuing again replaces the file with new keys (the old file stays valid: NATS JWTs are
    /// not revoked by this; see the README).
    pub fn issue(&self, role: Role, name: &str) -> Result<PathBuf> {
        if !names::valid_name(name) {
            bail!(
                "{} name {name:?}: use 1 to 32 letters, digits, - and _ (it becomes part of subjects and bucket names)",
                role.as_str()
            );
        }
        let account = self.load_key("account")?;
        let user = nkeys::KeyPair::new_user();
        let identity = Identity {
            role,
            name: name.into(),
        };
        let (publish, subscribe) = permissions(&identity);
        let mut nats = json!({
            "pub": publish, "sub": subscribe,
            "subs": -1, "data": -1, "payload": -1,
            "tags": [format!("grid-role:{}", role.as_str())],
            "type": "user", "version": 2,
        });
        if role == Role::Operator {
            nats["pub"] = json!({});
            nats["sub"] = json!({});
        }
        let jwt = sign(
            &account,
            &json!({"name": name, "sub": user.public_key(), "nats": nats}),
        )?;
        let seed = user.seed().map_err(|e| anyhow!("{e}"))?;
        let text = format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        );
        let path = self.creds(role, name);
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    fn key(&self, name: &str, new: fn() -> nkeys::KeyPair) -> Result<nkeys::KeyPair> {
        if self.dir.join(format!("{name}.nk")).is_file() {
            return self.load_key(name);
        }
        let key = new();
        let seed = key.seed().map_err(|e| anyhow!("{e}"))?;
        write_private(&self.dir.join(format!("{name}.nk")), seed.as_bytes())?;
        Ok(key)
    }

    fn load_key(&self, name: &str) -> Result<nkeys::KeyPair> {
        let path = self.dir.join(format!("{name}.nk"));
        let seed = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (run `grid auth init --dir {}` first, or point --auth-dir at the grid's auth folder)",
                path.display(),
                self.dir.display()
            )
        })?;
        nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| anyhow!("{}: {e}", path.display()))
    }
}

/// The subject permissions of `who`: (publish, subscribe), as JWT permission objects.
fn permissions(who: &Identity) -> (serde_json::Value, serde_json::Value) {
    let inbox = format!("{}.>", who.inbox_prefix());
    let name = who.name.as_str();
    match who.role {
        Role::Operator => (json!({}), json!({})),
        Role::Tenant => {
            let store = format!("OBJ_{}", names::tenant_store(name));
            let mut allow = vec![
                format!("grid.api.{name}.>"),
                "$JS.API.INFO".into(),
                "$JS.FC.>".into(),
                format!("$JS.API.STREAM.INFO.{store}"),
                format!("$JS.API.DIRECT.GET.{store}"),
                format!("$JS.API.DIRECT.GET.{store}.>"),
                format!("$JS.API.STREAM.PURGE.{store}"),
                format!("$O.{}.>", names::tenant_store(name)),
            ];
            // Its own records and ledger entries: keys that start with its name.
            for bucket in [names::JOBS_BUCKET, names::TASKS_BUCKET, names::USAGE_BUCKET] {
                allow.push(format!("$JS.API.STREAM.INFO.KV_{bucket}"));
                allow.push(format!(
                    "$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{name}.>"
                ));
                allow.push(format!(
                    "$JS.API.CONSUMER.CREATE.KV_{bucket}.*.$KV.{bucket}.{name}.>"
                ));
                allow.push(format!("$JS.API.CONSUMER.MSG.NEXT.KV_{bucket}.*"));
            }
            // Nodes and their tallies are public within a grid (`grid nodes`).
            for bucket in [names::NODES_BUCKET, names::TALLY_BUCKET] {
                allow.push(format!("$JS.API.STREAM.INFO.KV_{bucket}"));
                allow.push(format!("$JS.API.DIRECT.GET.KV_{bucket}.>"));
                allow.push(format!("$JS.API.CONSUMER.CREATE.KV_{bucket}"));
                allow.push(format!("$JS.API.CONSUMER.CREATE.KV_{bucket}.>"));
            }
            let events = format!("grid.events.{name}.>");
            (json!({"allow": allow}), json!({"allow": [inbox, events]}))
        }
        Role::Provider => {
            // Everything a node does goes through its own subjects: nothing in JetStream's
            // stores but its stage and its heartbeat, no reads but through the broker.
            let allow = vec![
                "$JS.API.INFO".to_string(),
                // Opening the heartbeat bucket.
                format!("$JS.API.STREAM.INFO.KV_{}", names::NODES_BUCKET),
                format!("$KV.{}.{name}", names::NODES_BUCKET),
                // Its own stage: the one place in JetStream's stores it may write.
                names::stage_subject(name),
                // Requests to the broker: its stage, tasks, reports of them, the objects they
                // need, replica claims.
                format!("grid.provider.{name}.>"),
                format!("grid.results.{name}.>"),
            ];
            (
                json!({"allow": allow}),
                json!({"allow": [inbox, "grid.cancel.>"]}),
            )
        }
    }
}

/// A NATS JWT (v2) with `claims`, signed by `issuer`.
fn sign(issuer: &nkeys::KeyPair, claims: &serde_json::Value) -> Result<String> {
    let mut claims = claims.clone();
    claims["iss"] = json!(issuer.public_key());
    claims["iat"] = json!(crate::now_unix_ms() / 1000);
    // The JWT id: a hash of the claims without it (as nats-jwt computes it).
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(serde_json::to_vec(&claims)?)
    };
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(&digest));
    let header = base64_url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = base64_url(&serde_json::to_vec(&claims)?);
    let signed = format!("{header}.{body}");
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|e| anyhow!("signing: {e}"))?;
    Ok(format!("{signed}.{}", base64_url(&signature)))
}

fn base64_url(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

fn base64_url_decode(text: &str) -> Option<Vec<u8>> {
    data_encoding::BASE64URL_NOPAD
        .decode(text.trim_end_matches('=').as_bytes())
        .ok()
}

fn restrict(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// Writes a secret: readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_name_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthDir::new(dir.path());
        auth.init().unwrap();
        let path = auth.issue(Role::Tenant, "alice").unwrap();
        assert_eq!(
            Identity::of_creds_file(&path).unwrap(),
            Identity {
                role: Role::Tenant,
                name: "alice".into()
            }
        );
        assert_eq!(
            Identity::of_creds_file(&auth.operator_creds())
                .unwrap()
                .role,
            Role::Operator
        );
        assert!(
            auth.issue(Role::Tenant, "a.b").is_err(),
            "a dot would split subjects"
        );
    }
}

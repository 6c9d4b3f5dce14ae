//! `grid site init`: a provider site's leaf node, written out. A provider behind NAT or a
//! firewall runs one nats-server as a *leaf node* that dials out to the grid's core; its nodes
//! talk to that server on the site's own network. The leaf makes one link per provider, each
//! with that provider's credentials, so the core still applies each provider's permissions to
//! everything that crosses: the leaf adds reach, not rights.
//!
//! Each provider gets an account of its own on the leaf, with a local user and a random password,
//! so that one provider's nodes cannot speak through another's link. A node logs in with that
//! user (`nats://NAME:PASSWORD@HOST:PORT`, in the node config written beside the leaf's) and
//! still presents its own credentials, which name it to the broker.
//!
//! JetStream stays in the core: the leaf runs none. nats-server keeps JetStream's API from
//! crossing a leaf link of a non-system account unless both ends map the account to the default
//! domain (`default_js_domain`, which `grid auth init` sets on the core's side and this module on
//! the leaf's).

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use grid_client::auth::{Identity, Role, write_private};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// Write a leaf-node config for this site and a node config per provider: nats-server
    /// dials out to the core, the site's nodes connect to it.
    #[command(after_help = crate::help::SITE)]
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The folder to write: leaf.conf, a copy of each credentials file and of the CA, and
    /// node-NAME.toml for each provider (made if missing; the files in it are secrets).
    pub dir: PathBuf,
    /// The core's leaf-node URLs, comma-separated, e.g. tls://core-1.example.org:7422 (every
    /// core server, so that the link fails over).
    #[arg(long, value_name = "URLS")]
    pub hub: String,
    /// A provider's credentials (`grid provider add NAME` on the operator's side); repeat for
    /// each provider of the site.
    #[arg(long, value_name = "FILE", required = true)]
    pub creds: Vec<PathBuf>,
    /// The CA that signed the core's certificate, when it is not one the system trusts.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Where the leaf serves the site's nodes: loopback for nodes on this machine, an address of
    /// the site's network for nodes on its other machines.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:4222")]
    pub listen: String,
}

pub fn site(command: SiteCommand) -> Result<ExitCode> {
    let SiteCommand::Init(args) = command;
    let site = Site::from_args(&args)?;
    site.write(&args.dir)?;
    let dir = args.dir.display();
    println!("{}", args.dir.join("leaf.conf").display());
    eprintln!("grid: site written to {dir}; start its leaf with `nats-server -c {dir}/leaf.conf`");
    for provider in &site.providers {
        eprintln!(
            "grid: then provider {name}'s node: `grid-node --config {dir}/node-{name}.toml`",
            name = provider.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What a site's files say: the core to dial, its CA, the providers that link through it.
struct Site {
    hub: Vec<String>,
    ca: Option<String>,
    listen: (String, u16),
    providers: Vec<Provider>,
}

struct Provider {
    name: String,
    creds: String,
    password: String,
}

impl Site {
    fn from_args(args: &InitArgs) -> Result<Self> {
        let hub = args
            .hub
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| {
                let scheme = url.split_once("://").map(|(s, _)| s);
                match scheme {
                    Some("tls" | "nats-leaf" | "nats") => Ok(url.to_string()),
                    _ => bail!(
                        "--hub {url}: expected tls://HOST:PORT (the core's leaf-node port, 7422 by default)"
                    ),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if hub.is_empty() {
            bail!("--hub: give the core's leaf-node URL, e.g. tls://core-1.example.org:7422");
        }
        let listen = args
            .listen
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)))
            .ok_or_else(|| anyhow!("--listen {}: expected HOST:PORT", args.listen))?;
        let ca = args
            .ca
            .as_deref()
            .map(|path| {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the CA {}", path.display()))?;
                if !pem.contains("BEGIN CERTIFICATE") {
                    bail!("{} is not a PEM certificate", path.display());
                }
                Ok(pem)
            })
            .transpose()?;
        let mut providers: Vec<Provider> = Vec::new();
        for path in &args.creds {
            let creds = grid_client::auth::read_creds(path)?;
            let who = Identity::of_creds(&creds)
                .with_context(|| format!("credentials {}", path.display()))?;
            if who.role != Role::Provider {
                bail!(
                    "{} are a {}'s credentials: a site links providers (`grid provider add NAME`)",
                    path.display(),
                    who.role.as_str()
                );
            }
            if providers.iter().any(|p| p.name == who.name) {
                bail!("provider {} is given twice", who.name);
            }
            providers.push(Provider {
                name: who.name,
                creds,
                password: password()?,
            });
        }
        Ok(Self {
            hub,
            ca,
            listen,
            providers,
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("finding {}", dir.display()))?;
        if let Some(ca) = &self.ca {
            write_private(&dir.join("ca.pem"), ca.as_bytes())?;
        }
        for p in &self.providers {
            write_private(&dir.join(format!("{}.creds", p.name)), p.creds.as_bytes())?;
            let node = format!(
                "# Provider {name}'s node at this site, written by `grid site init`: \
                 `grid-node --config {path}`.\n\
                 nats = \"nats://{name}:{password}@{host}:{port}\"\n\
                 creds = \"{creds}\"\n",
                name = p.name,
                password = p.password,
                path = dir.join(format!("node-{}.toml", p.name)).display(),
                host = connect_host(&self.listen.0),
                port = self.listen.1,
                creds = dir.join(format!("{}.creds", p.name)).display(),
            );
            write_private(&dir.join(format!("node-{}.toml", p.name)), node.as_bytes())?;
        }
        write_private(&dir.join("leaf.conf"), self.leaf_config(&dir).as_bytes())
    }

    /// The leaf's nats-server config.
    fn leaf_config(&self, dir: &Path) -> String {
        let mut text = String::from(
            "# A Grid provider site's leaf node, written by `grid site init`.\n\
             # Run it with `nats-server -c leaf.conf`; it dials out to the grid's core, once per\n\
             # provider, with that provider's credentials.\n",
        );
        let _ = writeln!(
            text,
            "listen: \"{}:{}\"\n\
             # A link whose packets vanish (no reset) is dropped after 3 unanswered pings, 5 s\n\
             # apart, and made again to any core server; nats-server's default waits 2 minutes.\n\
             ping_interval: \"5s\"\n\
             ping_max: 3\n\
             # JetStream is the core's; nats-server lets its API cross to the core only for\n\
             # accounts mapped to the default domain (a setting it marks as temporary).\n\
             default_js_domain: {{",
            self.listen.0, self.listen.1
        );
        for p in &self.providers {
            let _ = writeln!(text, "  \"{}\": \"\"", p.name);
        }
        text.push_str("}\naccounts {\n");
        for p in &self.providers {
            let _ = writeln!(
                text,
                "  \"{name}\": {{ users: [{{ user: \"{name}\", password: \"{password}\" }}] }}",
                name = p.name,
                password = p.password
            );
        }
        text.push_str("}\nleafnodes {\n  reconnect: \"2s\"\n  remotes: [\n");
        let urls = self
            .hub
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        for p in &self.providers {
            let _ = write!(
                text,
                "    {{ urls: [{urls}], account: \"{name}\", credentials: \"{creds}\"",
                name = p.name,
                creds = dir.join(format!("{}.creds", p.name)).display()
            );
            if self.ca.is_some() {
                let _ = write!(
                    text,
                    ", tls: {{ ca_file: \"{}\" }}",
                    dir.join("ca.pem").display()
                );
            }
            text.push_str(" }\n");
        }
        text.push_str("  ]\n}\n");
        text
    }
}

/// The address a node dials for a leaf that listens on `host`: the wildcard address is served
/// on loopback too.
fn connect_host(host: &str) -> &str {
    match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "[::1]",
        other => other,
    }
}

/// A local password: 128 bits from the system's randomness, in hex (safe in a URL and a config).
fn password() -> Result<String> {
    use rand::TryRng;
    let mut bytes = [0u8; 16];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| anyhow!("making a password: {e}"))?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_links_each_provider_with_its_own_account_and_credentials() {
        let auth_dir = tempfile::tempdir().unwrap();
        let auth = grid_client::auth::AuthDir::new(auth_dir.path());
        auth.init().unwrap();
        let a = auth.issue(Role::Provider, "lab-3").unwrap();
        let b = auth.issue(Role::Provider, "lab-4").unwrap();
        let tenant = auth.issue(Role::Tenant, "alice").unwrap();
        let out = tempfile::tempdir().unwrap();
        let ca = out.path().join("given-ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let args = |creds: Vec<PathBuf>| InitArgs {
            dir: out.path().join("site"),
            hub: "tls://10.0.0.1:7422,tls://10.0.0.2:7422".into(),
            creds,
            ca: Some(ca.clone()),
            listen: "0.0.0.0:4222".into(),
        };
        let site = Site::from_args(&args(vec![a.clone(), b.clone()])).unwrap();
        site.write(&out.path().join("site")).unwrap();
        let dir = out.path().join("site").canonicalize().unwrap();
        let leaf = std::fs::read_to_string(dir.join("leaf.conf")).unwrap();
        for name in ["lab-3", "lab-4"] {
            assert!(leaf.contains(&format!(
                "account: \"{name}\", credentials: \"{}\"",
                dir.join(format!("{name}.creds")).display()
            )));
            let node = std::fs::read_to_string(dir.join(format!("node-{name}.toml"))).unwrap();
            assert!(node.contains(&format!("nats = \"nats://{name}:")), "{node}");
            assert!(node.contains("@127.0.0.1:4222\""), "{node}");
        }
        assert_eq!(
            leaf.matches("urls: [\"tls://10.0.0.1:7422\", \"tls://10.0.0.2:7422\"]")
                .count(),
            2
        );
        assert_eq!(leaf.matches("ca_file").count(), 2);
        // Each provider's password differs.
        assert_eq!(site.providers.len(), 2);
        assert_ne!(site.providers[0].password, site.providers[1].password);
        // A tenant's credentials, a provider given twice, and a bad hub are refused by name.
        let refused = |args: InitArgs| format!("{:#}", Site::from_args(&args).err().unwrap());
        assert!(refused(args(vec![tenant])).contains("tenant's credentials"));
        assert!(refused(args(vec![a.clone(), a.clone()])).contains("given twice"));
        let mut bad = args(vec![a]);
        bad.hub = "core:7422".into();
        assert!(refused(bad).contains("expected tls://HOST:PORT"));
    }
}

//! A grid deployed on a [`Lab`] as it would be across machines: three core servers (one per
//! host, clustered, every stream and bucket at R3, a leaf-node port behind TLS), the broker on a
//! host of its own, a tenant's host for `grid` commands, and provider sites, each a host with one
//! leaf-node nats-server (written by `grid site init`) that dials out to the core over TLS, once
//! per provider, and that provider's nodes behind it.
//!
//! The CA and the core's certificate come from openssl, made fresh for each deployment.

use super::lab::{Lab, SUBNET};
use crate::part::Part;
use crate::setup;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const CORE: usize = 3;

/// What to deploy.
pub struct Plan {
    pub sites: usize,
    pub providers_per_site: usize,
    pub slots: u32,
    /// Sites whose leaf reaches the core through a delaying proxy: (site, one-way delay).
    pub slow_sites: Vec<(usize, Duration)>,
}

pub struct Deployment {
    /// The parts, by name: `core-1`, `broker`, `leaf-site-2`, `node-p2-1`, `proxy-site-3`.
    /// Declared before the lab so that they are killed before its namespaces go.
    pub parts: BTreeMap<String, Part>,
    pub lab: Lab,
    pub dir: PathBuf,
    grid: String,
    /// The core's client URLs, comma-separated.
    pub core_urls: String,
    tenant_creds: PathBuf,
    /// Each site's host name and its providers' names.
    pub sites: Vec<(String, Vec<String>)>,
}

fn core_ip(i: usize) -> String {
    format!("{SUBNET}.{}", 10 + i)
}

fn site_last(s: usize) -> u8 {
    100 + s as u8
}

impl Deployment {
    pub fn start(dir: &Path, plan: &Plan) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        let grid = crate::target_dir()
            .join("debug/grid")
            .to_string_lossy()
            .into_owned();
        let nats_server = setup::nats_server()?.to_string_lossy().into_owned();
        let mut lab = Lab::new()?;
        for i in 1..=CORE {
            lab.add_host(&format!("core-{i}"), 10 + i as u8)?;
        }
        lab.add_host("broker", 20)?;
        lab.add_host("tenant", 30)?;
        for s in 1..=plan.sites {
            lab.add_host(&format!("site-{s}"), site_last(s))?;
        }

        // The operator's side: its setup, a tenant, a provider per node.
        let auth = dir.join("auth");
        let make = |args: &[&str]| crate::grid_operator(&grid, &auth, args);
        let server_conf = std::fs::read_to_string(make(&["auth", "init"])?)?;
        let tenant_creds = PathBuf::from(make(&["tenant", "add", "default"])?);
        let sites: Vec<(String, Vec<String>)> = (1..=plan.sites)
            .map(|s| {
                let providers = (1..=plan.providers_per_site)
                    .map(|k| format!("p{s}-{k}"))
                    .collect();
                (format!("site-{s}"), providers)
            })
            .collect();
        for (_, providers) in &sites {
            for p in providers {
                make(&["provider", "add", p])?;
            }
        }
        let core_ips: Vec<String> = (1..=CORE).map(core_ip).collect();
        make_certificates(dir, &core_ips)?;

        let mut parts = BTreeMap::new();
        let start = |parts: &mut BTreeMap<String, Part>,
                     name: &str,
                     host: &str,
                     cmd: Vec<String>,
                     env: Vec<(String, String)>|
         -> Result<()> {
            let log = dir.join(format!("logs/{name}.log"));
            parts.insert(name.to_string(), Part::new(lab.on(host, &cmd), env, log)?);
            Ok(())
        };

        // The core: clustered, JetStream on each, a TLS leaf-node port.
        let routes = core_ips
            .iter()
            .map(|ip| format!("\"nats://{ip}:6222\""))
            .collect::<Vec<_>>()
            .join(", ");
        for (i, ip) in core_ips.iter().enumerate() {
            let name = format!("core-{}", i + 1);
            let config = format!(
                "{server_conf}\n\
                 server_name: {name}\n\
                 listen: \"{ip}:4222\"\n\
                 jetstream {{ store_dir: \"{store}\", max_file_store: 64G }}\n\
                 cluster {{ name: grid, listen: \"{ip}:6222\", routes: [{routes}] }}\n\
                 leafnodes {{\n  listen: \"{ip}:7422\"\n  tls {{ cert_file: \"{cert}\", key_file: \"{key}\", timeout: 5 }}\n}}\n",
                store = dir.join(&name).display(),
                cert = dir.join("core.pem").display(),
                key = dir.join("core-key.pem").display(),
            );
            let path = dir.join(format!("{name}.conf"));
            std::fs::write(&path, config)?;
            start(
                &mut parts,
                &name,
                &name,
                vec![nats_server.clone(), "-c".into(), path.display().to_string()],
                Vec::new(),
            )?;
        }
        let core_urls = core_ips
            .iter()
            .map(|ip| format!("nats://{ip}:4222"))
            .collect::<Vec<_>>()
            .join(",");
        for i in 1..=CORE {
            wait_for_log(&dir.join(format!("logs/core-{i}.log")), "Server is ready")?;
        }

        start(
            &mut parts,
            "broker",
            "broker",
            vec![
                grid.clone(),
                "broker".into(),
                "--nats".into(),
                core_urls.clone(),
                "--stream-replicas".into(),
                CORE.to_string(),
                // A store's quota is reserved on each core server (see ARCHITECTURE.md).
                "--tenant-quota".into(),
                "1GiB".into(),
                "--creds".into(),
                auth.join("creds/operator-broker.creds")
                    .display()
                    .to_string(),
            ],
            vec![("RUST_LOG".into(), "grid_broker=debug".into())],
        )?;

        // The sites: `grid site init` writes each leaf's config, as a provider would.
        let compiled = dir.join("compiled");
        for (s, (site, providers)) in sites.iter().enumerate() {
            let s = s + 1;
            let site_dir = dir.join(site);
            let slow = plan
                .slow_sites
                .iter()
                .find(|(x, _)| *x == s)
                .map(|(_, d)| *d);
            // A slow site's leaf dials a proxy on its own host, which delays every byte.
            let hub = match slow {
                Some(_) => "tls://127.0.0.1:17422".to_string(),
                None => core_ips
                    .iter()
                    .map(|ip| format!("tls://{ip}:7422"))
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let mut init = vec![
                "site".to_string(),
                "init".into(),
                site_dir.display().to_string(),
                "--hub".into(),
                hub,
                "--ca".into(),
                dir.join("ca.pem").display().to_string(),
            ];
            for p in providers {
                init.push("--creds".into());
                init.push(
                    auth.join(format!("creds/provider-{p}.creds"))
                        .display()
                        .to_string(),
                );
            }
            let init: Vec<&str> = init.iter().map(String::as_str).collect();
            let out = Command::new(&grid).args(&init).output()?;
            if !out.status.success() {
                bail!(
                    "grid site init: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            if let Some(delay) = slow {
                start(
                    &mut parts,
                    &format!("proxy-{site}"),
                    site,
                    vec![
                        std::env::current_exe()?.display().to_string(),
                        "netgrid-proxy".into(),
                        "127.0.0.1:17422".into(),
                        format!("{}:7422", core_ips[0]),
                        delay.as_millis().to_string(),
                    ],
                    Vec::new(),
                )?;
            }
            start(
                &mut parts,
                &format!("leaf-{site}"),
                site,
                vec![
                    nats_server.clone(),
                    "-c".into(),
                    site_dir.join("leaf.conf").display().to_string(),
                ],
                Vec::new(),
            )?;
            wait_for_log(
                &dir.join(format!("logs/leaf-{site}.log")),
                "Server is ready",
            )?;
            for p in providers {
                start(
                    &mut parts,
                    &format!("node-{p}"),
                    site,
                    vec![
                        grid.clone(),
                        "node".into(),
                        "--config".into(),
                        site_dir
                            .join(format!("node-{p}.toml"))
                            .display()
                            .to_string(),
                        "--slots".into(),
                        plan.slots.to_string(),
                        "--no-gpu".into(),
                        "--grace".into(),
                        "1s".into(),
                        "--cache-dir".into(),
                        site_dir.join(format!("cache-{p}")).display().to_string(),
                        "--compiled-dir".into(),
                        compiled.display().to_string(),
                    ],
                    vec![("RUST_LOG".into(), "grid_node::worker=debug".into())],
                )?;
            }
        }
        let deployment = Self {
            parts,
            lab,
            dir: dir.to_path_buf(),
            grid,
            core_urls,
            tenant_creds,
            sites,
        };
        deployment.wait_for_nodes(Duration::from_secs(180))?;
        Ok(deployment)
    }

    /// Every provider's name.
    pub fn providers(&self) -> impl Iterator<Item = &String> {
        self.sites.iter().flat_map(|(_, p)| p)
    }

    /// `grid ARGS --nats CORE` run as the tenant, from the tenant's host.
    pub fn grid(&self, args: &[&str]) -> Result<Output> {
        let mut cmd: Vec<String> = vec![self.grid.clone()];
        cmd.extend(args.iter().map(|a| a.to_string()));
        cmd.extend(["--nats".to_string(), self.core_urls.clone()]);
        let full = self.lab.on("tenant", &cmd);
        Command::new(&full[0])
            .args(&full[1..])
            .env("GRID_CREDS", &self.tenant_creds)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running grid {}", args.join(" ")))
    }

    /// Waits until `grid nodes` lists every provider's node.
    fn wait_for_nodes(&self, limit: Duration) -> Result<()> {
        let want = self.providers().count();
        let started = Instant::now();
        loop {
            let out = self.grid(&["nodes", "--json"])?;
            let online = String::from_utf8_lossy(&out.stdout).lines().count();
            if online >= want {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!(
                    "{online} of {want} nodes came online within {} s (logs in {})",
                    limit.as_secs(),
                    self.dir.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// CPU seconds (user + system) the named parts have used so far.
    pub fn cpu_seconds(&self, names: impl Fn(&str) -> bool) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        self.parts
            .iter()
            .filter(|(name, _)| names(name))
            .filter_map(|(_, part)| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", part.pid()?)).ok()?;
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) / ticks)
            })
            .sum()
    }

    /// The core server the leaf of `site` linked to last (from its log).
    pub fn leaf_link_of(&self, site: &str) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.join(format!("logs/leaf-{site}.log"))).ok()?;
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("Leafnode connection created"))?;
        (1..=CORE)
            .find(|i| line.contains(&format!("{}:7422", core_ip(*i))))
            .map(|i| format!("core-{i}"))
    }

    /// How often `what` appears in the logs of the parts whose names pass `names`.
    pub fn count_in_logs(&self, names: impl Fn(&str) -> bool, what: &str) -> u64 {
        self.parts
            .iter()
            .filter(|(name, _)| names(name))
            .map(|(_, part)| {
                std::fs::read_to_string(part.log())
                    .unwrap_or_default()
                    .matches(what)
                    .count() as u64
            })
            .sum()
    }
}

/// A CA, and one certificate for the core servers' leaf-node port, valid for their addresses
/// and for loopback (a slow site's proxy).
fn make_certificates(dir: &Path, ips: &[String]) -> Result<()> {
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=netgrid CA"];
    ca.extend(key);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
    openssl(&ca)?;
    let mut csr = vec!["req", "-subj", "/CN=grid core"];
    csr.extend(key);
    csr.extend(["-keyout", "core-key.pem", "-out", "core.csr"]);
    openssl(&csr)?;
    let san = ips
        .iter()
        .map(|ip| format!("IP:{ip}"))
        .chain(["IP:127.0.0.1".to_string()])
        .collect::<Vec<_>>()
        .join(",");
    std::fs::write(
        dir.join("core.ext"),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "core.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "core.ext",
        "-out",
        "core.pem",
    ])
}

/// Waits until `log` says `what` (a server started inside a namespace cannot be probed from
/// outside it).
fn wait_for_log(log: &Path, what: &str) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(what)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{} did not say {what:?} within 30 s", log.display())
}

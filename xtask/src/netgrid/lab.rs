//! Hosts on one machine: network namespaces joined by veth pairs to a bridge, itself in a
//! namespace of its own (the "wan"), so that nothing here touches the machine's own network.
//! Each host has one interface, `eth0`, at an address of 10.77.0.0/24; its link can be cut and
//! restored at the bridge's end (a cable pulled), and a route can drop its packets to one
//! address (a one-way partition).
//!
//! Every namespace is named `gridnet-<pid>-<host>`, the pid being this xtask's. What a run made
//! is removed when its [`Lab`] is dropped; if the run is killed instead, a watchdog (a shell in a
//! session of its own, started with the lab) removes it once the pid is gone, and the next lab
//! also sweeps up namespaces whose xtask is no longer running.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};

pub const SUBNET: &str = "10.77.0";

pub struct Lab {
    prefix: String,
    hosts: Vec<Host>,
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
    /// Its veth's end on the bridge, in the wan namespace.
    port: String,
}

impl Lab {
    pub fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "netgrid makes network namespaces, which needs root: run it as root (e.g. `sudo -E cargo xtask netgrid`)"
            );
        }
        // `ip` itself: `setup::network_tools`, which netgrid runs first.
        sweep_stale();
        let pid = std::process::id();
        let prefix = format!("gridnet-{pid}-");
        // The watchdog: once this process is gone, whatever it made goes too.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             for ns in $(ip netns list | awk '{{print $1}}' | grep '^{prefix}'); do \
               ip netns pids $ns | xargs -r kill -9; ip netns del $ns; done"
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the namespace watchdog (setsid)")?;
        let lab = Self {
            prefix,
            hosts: Vec::new(),
        };
        let wan = lab.ns("wan");
        ip(&["netns", "add", &wan])?;
        ip(&["-n", &wan, "link", "set", "lo", "up"])?;
        ip(&["-n", &wan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &wan, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// A new host `name` at `SUBNET.last`, its link up.
    pub fn add_host(&mut self, name: &str, last: u8) -> Result<&Host> {
        let ns = self.ns(name);
        let wan = self.ns("wan");
        let ip_addr = format!("{SUBNET}.{last}");
        let port = format!("v{last}");
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &wan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &wan, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        self.hosts.push(Host {
            name: name.to_string(),
            ns,
            ip: ip_addr,
            port,
        });
        Ok(self.hosts.last().expect("just pushed"))
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the lab"))
    }

    /// `cmd` as run on `host`: `ip netns exec NS cmd…`.
    pub fn on(&self, host: &str, cmd: &[String]) -> Vec<String> {
        let mut full = vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            self.host(host).ns.clone(),
        ];
        full.extend(cmd.iter().cloned());
        full
    }

    /// Pulls `host`'s cable: its link goes down at the bridge.
    pub fn cut(&self, host: &str) -> Result<()> {
        let port = &self.host(host).port;
        ip(&["-n", &self.ns("wan"), "link", "set", port, "down"])
    }

    pub fn restore(&self, host: &str) -> Result<()> {
        let port = &self.host(host).port;
        ip(&["-n", &self.ns("wan"), "link", "set", port, "up"])
    }

    /// Drops every packet `from` sends to `to`; what `to` sends still arrives.
    pub fn blackhole(&self, from: &str, to: &str) -> Result<()> {
        let dest = format!("{}/32", self.host(to).ip);
        ip(&[
            "-n",
            &self.host(from).ns,
            "route",
            "add",
            "blackhole",
            &dest,
        ])
    }

    pub fn unblackhole(&self, from: &str, to: &str) -> Result<()> {
        let dest = format!("{}/32", self.host(to).ip);
        ip(&[
            "-n",
            &self.host(from).ns,
            "route",
            "del",
            "blackhole",
            &dest,
        ])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The processes first (the caller's parts are dropped before the lab; anything left,
        // such as a command still running, is killed here), then the namespaces: the veths and
        // the bridge go with them.
        for host in &self.hosts {
            remove_ns(&host.ns);
        }
        remove_ns(&self.ns("wan"));
    }
}

fn remove_ns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-9").args(&pids).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces of netgrid runs whose xtask is gone (killed before its watchdog ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("gridnet-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_ns(name);
        }
    }
}

/// Runs `ip ARGS`, failing with what it said.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

//! `xtask netgrid-proxy LISTEN TARGET DELAY_MS`: a TCP proxy that holds every byte for DELAY_MS
//! in each direction, a slow link where the kernel offers no `tc netem`. It runs inside a site's
//! namespace, between the site's leaf node and a core server.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn run(args: &[String]) -> Result<()> {
    let [listen, target, delay] = args else {
        anyhow::bail!("usage: xtask netgrid-proxy LISTEN TARGET DELAY_MS");
    };
    let delay = Duration::from_millis(delay.parse().context("DELAY_MS")?);
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(target) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        for (from, to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
            pump(from, to, delay);
        }
    }
    Ok(())
}

/// Copies `from` to `to`, each chunk delivered `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

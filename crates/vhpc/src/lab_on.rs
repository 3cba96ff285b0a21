//! `vhpc lab on K -- CMD`: inside a multi-host lab, run CMD on host K through its command
//! service ([`vhpc_lab::command_service`]) and relay its output and exit status.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_lab::command_service::encode_request;
use vhpc_lab::network::{COMMAND_PORT, MAX_HOSTS, host_ip};

use crate::cli::LabOnArgs;
use crate::relay::{AgentRelay, AgentReport};

pub fn run(args: LabOnArgs) -> anyhow::Result<i32> {
    if !(1..=MAX_HOSTS).contains(&args.host) {
        bail!(
            "no lab host {}: hosts are numbered 1 to {MAX_HOSTS} (vhpc lab run --hosts N)",
            args.host
        );
    }
    let address = format!("{}:{COMMAND_PORT}", host_ip(args.host));
    let mut stream = connect(&address, Duration::from_secs(args.wait)).with_context(|| {
        format!(
            "cannot reach lab host {} at {address}; is this inside `vhpc lab run --hosts N` \
             with N >= {}?",
            args.host, args.host
        )
    })?;
    stream
        .write_all(&encode_request(&args.command))
        .with_context(|| format!("cannot send the command to {address}"))?;
    let report = AgentReport::default();
    let mut relay = AgentRelay::new(report.clone());
    let mut buf = [0u8; 8192];
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("lost the connection to {address}"))?;
        if n == 0 {
            break;
        }
        relay.write_all(&buf[..n])?;
    }
    match report.exit_status() {
        Some(status) => Ok(status),
        None => bail!(
            "lab host {} closed the connection without a status",
            args.host
        ),
    }
}

/// Connects, retrying while the host boots (refused, unreachable) until `wait` has passed.
fn connect(address: &str, wait: Duration) -> std::io::Result<TcpStream> {
    let address: std::net::SocketAddr = address
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let deadline = Instant::now() + wait;
    loop {
        // A bounded attempt: a host that does not answer ARP yet would block connect for ~2 min.
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

//! `vhpc guest-ticker`: a guest-side program for measuring downtime as the guest's own work
//! sees it. It sends a numbered UDP datagram to a host address at a fixed interval, forever;
//! the host timestamps their arrival (`vhpc bench migrate`). A migration's pause shows as the
//! longest gap between two arrivals, whatever the guest's clock says: a restored kvmclock
//! hides the pause from the guest itself.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::Context;

/// Arguments of `vhpc guest-ticker`.
#[derive(clap::Args)]
pub struct TickerArgs {
    /// Where the ticks go (the host's address on the guest's network).
    #[arg(long)]
    pub to: SocketAddr,
    /// Milliseconds between ticks.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
}

/// A tick's datagram: its sequence number, little-endian.
pub fn tick(seq: u64) -> [u8; 8] {
    seq.to_le_bytes()
}

/// The sequence number in a tick's datagram, if it is one.
pub fn parse_tick(datagram: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(datagram.try_into().ok()?))
}

pub fn run(args: TickerArgs) -> anyhow::Result<i32> {
    let bind: SocketAddr = if args.to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("cannot open a UDP socket")?;
    let interval = Duration::from_millis(args.interval_ms.max(1));
    let mut reported = false;
    for seq in 0u64.. {
        // A send can fail while the network is not up yet (or during a move); the ticks
        // that are lost are the measurement, so the ticker goes on.
        if let Err(e) = socket.send_to(&tick(seq), args.to)
            && !reported
        {
            eprintln!(
                "vhpc guest-ticker: cannot send to {}: {e} (going on)",
                args.to
            );
            reported = true;
        }
        std::thread::sleep(interval);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_trip_and_other_datagrams_are_not_ticks() {
        assert_eq!(parse_tick(&tick(0)), Some(0));
        assert_eq!(parse_tick(&tick(u64::MAX - 1)), Some(u64::MAX - 1));
        assert_eq!(parse_tick(b"hello"), None);
        assert_eq!(parse_tick(&[0; 9]), None);
    }
}

//! Counting packets on the underlay: an AF_PACKET socket (every interface, every protocol)
//! inside the underlay's bridge namespace, read on a thread until stopped. Native routing tests
//! use it to show that no VXLAN packet crossed the underlay while endpoint traffic did.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};

use crate::netns_io::in_netns;

/// What a capture saw (each packet once per interface it crossed in the namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnderlayCounts {
    /// IPv4 UDP to port 8472 or 4789 (VXLAN).
    pub vxlan: u64,
    /// IPv4 packets whose source or destination lies in 10.0.0.0/8 (the harness's pod CIDRs),
    /// i.e. endpoint traffic carried unencapsulated.
    pub pod_ipv4: u64,
}

pub struct UnderlayCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<UnderlayCounts>>,
}

const ETH_P_ALL: u16 = 0x0003;

fn classify(frame: &[u8], counts: &mut UnderlayCounts) {
    // Ethernet, IPv4 only.
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] == 17 && ip.len() >= ihl + 4 {
        let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
        if dport == 8472 || dport == 4789 {
            counts.vxlan += 1;
            return;
        }
    }
    if ip[12] == 10 || ip[16] == 10 {
        counts.pod_ipv4 += 1;
    }
}

impl UnderlayCapture {
    /// Starts capturing in the namespace at `netns`.
    pub fn start(netns: &Path) -> anyhow::Result<UnderlayCapture> {
        let fd = in_netns(netns, || {
            // SAFETY: plain socket(2); the result is checked and owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from(ETH_P_ALL.to_be()),
                )
            };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .context("capturing on the underlay")?;
        // A read timeout, so the thread notices the stop flag.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut counts = UnderlayCounts::default();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: recv into a buffer of the length given.
                    let n = unsafe {
                        libc::recv(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                            0,
                        )
                    };
                    if n > 0 {
                        classify(&buf[..n as usize], &mut counts);
                    }
                }
                counts
            })
        };
        Ok(UnderlayCapture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns what was seen.
    pub fn finish(mut self) -> UnderlayCounts {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for UnderlayCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = proto;
        f[14 + 12..14 + 16].copy_from_slice(&src);
        f[14 + 16..14 + 20].copy_from_slice(&dst);
        f[34 + 2..34 + 4].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn vxlan_and_pod_traffic_are_told_apart() {
        let mut c = UnderlayCounts::default();
        classify(
            &frame(17, [192, 168, 77, 11], [192, 168, 77, 12], 8472),
            &mut c,
        );
        classify(
            &frame(17, [192, 168, 77, 11], [192, 168, 77, 12], 4789),
            &mut c,
        );
        classify(&frame(6, [10, 1, 1, 2], [10, 2, 1, 2], 80), &mut c);
        classify(
            &frame(17, [192, 168, 77, 11], [192, 168, 77, 254], 2380),
            &mut c,
        );
        assert_eq!(
            c,
            UnderlayCounts {
                vxlan: 2,
                pod_ipv4: 1
            }
        );
    }
}

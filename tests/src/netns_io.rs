//! Sockets inside network namespaces. `setns` changes only the calling thread, and a socket
//! stays in the namespace it was created in, so each socket is created on a short-lived thread
//! that entered the namespace and then used from anywhere.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: a valid namespace fd; CLONE_NEWNET affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns into {}: {}",
                    netns.display(),
                    std::io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A TCP listener inside `netns`.
pub fn listen(netns: &Path, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    in_netns(netns, || {
        TcpListener::bind(addr).with_context(|| format!("binding {addr} in {}", netns.display()))
    })
}

/// A TCP connection from inside `netns`.
pub fn connect(netns: &Path, addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = in_netns(netns, || {
        TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr} from {}", netns.display()))
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Serves TCP echo on `port` inside `netns` until the process exits.
pub fn spawn_echo(netns: &Path, port: u16) -> anyhow::Result<()> {
    let listener = listen(netns, SocketAddr::from(([0, 0, 0, 0], port)))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Sends `msg` and expects it back.
pub fn echo_round_trip(stream: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    stream.write_all(msg).context("sending")?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).context("receiving the echo")?;
    if back != msg {
        bail!("echo differs: sent {msg:?}, got {back:?}");
    }
    Ok(())
}

/// Connects from `netns` to an echo server at `addr` and checks one round trip.
pub fn tcp_check(netns: &Path, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let mut s = connect(netns, addr, timeout)?;
    echo_round_trip(&mut s, format!("hello {addr}").as_bytes())
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo from inside `netns` to `to`, answered within `timeout`. A raw socket (root),
/// so it needs no `ping` binary and no ping_group_range.
pub fn icmp_ping(netns: &Path, to: std::net::Ipv4Addr, timeout: Duration) -> anyhow::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    static SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let fd = in_netns(netns, || {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if raw < 0 {
            bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    })?;
    let socket = std::net::UdpSocket::from(fd); // only for its timeout setters and fd
    socket.set_read_timeout(Some(timeout))?;
    let id = (std::process::id() & 0xffff) as u16;
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"meshd-e2e-ping..");
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    socket
        .send_to(&pkt, SocketAddr::from((to, 0)))
        .with_context(|| format!("sending ICMP echo to {to} from {}", netns.display()))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("no ICMP echo reply from {to} to {}", netns.display()))?;
        // A raw IPv4 socket returns the IP header too.
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if from.ip() == std::net::IpAddr::V4(to)
            && n >= ihl + 8
            && buf[ihl] == 0
            && buf[ihl + 4..ihl + 6] == id.to_be_bytes()
            && buf[ihl + 6..ihl + 8] == seq.to_be_bytes()
        {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("no ICMP echo reply from {to} to {}", netns.display());
        }
    }
}

/// A TCP connection from inside `netns` whose source port is `local_port` (bound before
/// connecting, SO_REUSEADDR so a port of a connection in TIME_WAIT can be used again).
pub fn connect_from_port(
    netns: &Path,
    local_port: u16,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(v4) = addr else {
        bail!("{addr} is not IPv4");
    };
    let fd = in_netns(netns, || {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if raw < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    })?;
    let one: libc::c_int = 1;
    let secs = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let local = sockaddr(std::net::Ipv4Addr::UNSPECIFIED, local_port);
    let remote = sockaddr(*v4.ip(), v4.port());
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, option values and sockaddr_in structs that outlive the calls.
    let rc: i32 = unsafe {
        let fd = fd.as_raw_fd();
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&secs as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) != 0
        {
            -1
        } else if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            -2
        } else if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            -3
        } else {
            0
        }
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let step = ["", "setsockopt", "bind", "connect"][rc.unsigned_abs() as usize];
        // connect(2) past SO_SNDTIMEO says EINPROGRESS: the SYN went unanswered.
        let why = if rc == -3 && err.raw_os_error() == Some(libc::EINPROGRESS) {
            format!("no answer within {timeout:?}")
        } else {
            err.to_string()
        };
        bail!(
            "{step} from port {local_port} to {addr} in {}: {why}",
            netns.display()
        );
    }
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Serves on `port` inside `netns` until the process exits: each connection first gets the
/// client address the server saw, as `IP:PORT\n`, then an echo of what it sends.
pub fn spawn_whoami(netns: &Path, port: u16) -> anyhow::Result<()> {
    let listener = listen(netns, SocketAddr::from(([0, 0, 0, 0], port)))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(peer) = conn.peer_addr() else { return };
                if conn.write_all(format!("{peer}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 65536];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Reads the `IP:PORT\n` line a [`spawn_whoami`] server sends first.
pub fn read_seen_address(stream: &mut TcpStream) -> anyhow::Result<SocketAddr> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        stream
            .read_exact(&mut byte)
            .context("reading the seen address")?;
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line);
            return text
                .parse()
                .with_context(|| format!("{text:?} is not IP:PORT"));
        }
        line.push(byte[0]);
    }
    bail!("no address line from the server")
}

/// Serves on `port` inside `netns` until the process exits: reads each connection to its end,
/// then answers with the number of bytes read (decimal) and closes. Its own packets stay small
/// (ACKs and that one line), for paths whose way back is narrower than the way there.
pub fn spawn_sink(netns: &Path, port: u16) -> anyhow::Result<()> {
    let listener = listen(netns, SocketAddr::from(([0, 0, 0, 0], port)))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let mut total = 0usize;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        let _ = conn.write_all(total.to_string().as_bytes());
                        break;
                    }
                    total += n;
                }
            });
        }
    });
    Ok(())
}

/// Sends `len` bytes from `netns` to a [`spawn_sink`] at `to` (full-size segments, DF set as
/// Linux TCP sets it) and checks the count the sink answers. Lost "fragmentation needed"
/// errors cost retransmission timeouts (1 s, 2 s, ...): the socket waits 30 s for room for a
/// few. The error says whether the upload stalled or the count differs.
pub fn upload_to_sink(netns: &Path, to: SocketAddr, len: usize) -> anyhow::Result<()> {
    let mut s = connect(netns, to, Duration::from_secs(10))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    s.write_all(&data)
        .with_context(|| format!("upload of {len} bytes to {to} stalled"))?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = String::new();
    s.read_to_string(&mut count)?;
    anyhow::ensure!(
        count == len.to_string(),
        "the sink at {to} received {count:?} bytes of {len}"
    );
    Ok(())
}

/// `ip route get DST` inside `netns` (a learned path MTU shows as `mtu N`).
pub fn route_get(netns: &Path, dst: std::net::Ipv4Addr) -> anyhow::Result<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ip", "route", "get", &dst.to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "ip route get {dst}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Serves UDP echo on `port` inside `netns` until the process exits.
pub fn spawn_udp_echo(netns: &Path, port: u16) -> anyhow::Result<()> {
    let socket = in_netns(netns, || {
        std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .with_context(|| format!("binding UDP {port} in {}", netns.display()))
    })?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// Sends a datagram from `netns` to `to` and waits for the same bytes back, resending every
/// second (a first datagram may meet an unresolved neighbour) until `timeout`.
pub fn udp_round_trip(
    netns: &Path,
    to: SocketAddr,
    msg: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let socket = in_netns(netns, || {
        std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).context("binding UDP")
    })?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        socket.send_to(msg, to)?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            if from == to && &buf[..n] == msg {
                return Ok(());
            }
        }
    }
    bail!(
        "no UDP echo from {to} to {} within {timeout:?}",
        netns.display()
    )
}

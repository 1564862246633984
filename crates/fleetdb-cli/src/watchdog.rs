//! The worker's watchdog: a process forked when the worker starts that kills the worker's
//! running commands once the worker's session is past its deadline, even while the worker itself
//! cannot act.
//!
//! The worker kills its commands when it sees its session lost, and `PR_SET_PDEATHSIG` kills them
//! when it dies. A worker that is stopped (SIGSTOP, a terminal's Ctrl-Z, a debugger) does
//! neither: its session expires, another worker claims the object and runs the command on it,
//! and the stopped worker's command runs on beside it until the worker is continued. The
//! watchdog is a process of its own, in a process group of its own (a Ctrl-Z stops the worker's
//! group, not it), told over a socket the session's deadline at every renewal and each command's
//! process group as it starts (by the command's own process, before it runs CMD: there is no
//! moment when a command runs unknown to it) and as it is reaped. When the deadline it was told
//! comes ([`KILL_AHEAD_MICROS`] early) without a renewal, it SIGKILLs every group it knows, and any that
//! starts after; when the worker is gone (its end of the socket closed: it exited or was killed),
//! it SIGKILLs them and exits.
//!
//! The watchdog is forked from the running worker, so it runs only async-signal-safe calls
//! (`poll`, `recv`, `clock_gettime`, `kill`, `_exit`) on memory of its own stack: no allocation,
//! no lock, no destructor.
//!
//! Linux only (as `PR_SET_PDEATHSIG`): elsewhere [`Watchdog::start`] starts nothing and the
//! worker alone watches its commands.

#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
pub use other::*;

#[cfg(not(target_os = "linux"))]
mod other {
    use std::os::fd::RawFd;

    use fleetdb::Timestamp;

    /// No watchdog on this system.
    pub struct Watchdog;

    impl Watchdog {
        pub fn start() -> std::io::Result<Watchdog> {
            Ok(Watchdog)
        }
        pub fn deadline(&self, _deadline: Timestamp, _now: Timestamp) {}
        pub fn done(&self, _pid: u32) {}
        pub fn fd(&self) -> Option<RawFd> {
            None
        }
    }

    pub fn announce(_fd: RawFd) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use fleetdb::Timestamp;

    /// How long before the session's deadline the watchdog kills a silent worker's commands: SIGKILL
    /// takes effect at once but a process is torn down asynchronously, and another worker may claim
    /// the object at the deadline itself.
    pub const KILL_AHEAD_MICROS: i64 = 50_000;

    /// Process groups the watchdog tracks at most (the worker runs at most `--concurrency`, 1,024).
    const GROUPS_MAX: usize = 1024;

    const MSG_DEADLINE: i64 = 1;
    const MSG_RUN: i64 = 2;
    const MSG_DONE: i64 = 3;

    /// The worker's end of the watchdog's socket.
    pub struct Watchdog {
        socket: OwnedFd,
    }

    impl Watchdog {
        /// Fork the watchdog of this process (the worker).
        pub fn start() -> std::io::Result<Watchdog> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: socketpair writes two descriptors into `fds`.
            let r = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            if r == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned here alone.
            let (ours, theirs) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let worker = std::process::id() as libc::pid_t;
            // SAFETY: the child runs `watch` only, which makes async-signal-safe calls and never
            // returns (it ends with `_exit`), as required of a child forked from a threaded process.
            match unsafe { libc::fork() } {
                -1 => Err(std::io::Error::last_os_error()),
                0 => unsafe { watch(theirs.as_raw_fd(), ours.as_raw_fd(), worker) },
                _child => {
                    drop(theirs);
                    Ok(Watchdog { socket: ours })
                }
            }
        }

        /// The session's deadline as last renewed, on the store's clock, whose time is `now`
        /// (on PostgreSQL the database server's, not this host's): told as a time of this host's
        /// boot clock, which neither a step of the wall clock nor an offset from the server's
        /// moves.
        pub fn deadline(&self, deadline: Timestamp, now: Timestamp) {
            let left = deadline.as_micros().saturating_sub(now.as_micros());
            send(
                self.socket.as_raw_fd(),
                MSG_DEADLINE,
                now_micros().saturating_add(left),
            );
        }

        /// A command's process group was reaped (or killed by the worker): no longer the watchdog's.
        pub fn done(&self, pid: u32) {
            send(self.socket.as_raw_fd(), MSG_DONE, pid as i64);
        }

        /// The descriptor a command's process uses to announce itself ([`announce`]) before it runs
        /// CMD (closed at exec).
        pub fn fd(&self) -> Option<RawFd> {
            Some(self.socket.as_raw_fd())
        }
    }

    /// Called in a command's process between fork and exec: this process's group is a command's.
    /// Async-signal-safe. Fails when the watchdog cannot be told (it is gone): the command must not
    /// run unwatched.
    pub fn announce(fd: RawFd) -> std::io::Result<()> {
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() };
        if send(fd, MSG_RUN, pid as i64) {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// One message to the watchdog; never blocks, never raises SIGPIPE. Async-signal-safe.
    fn send(fd: RawFd, kind: i64, value: i64) -> bool {
        let msg = [kind, value];
        // SAFETY: `msg` is 16 readable bytes.
        let n = unsafe {
            libc::send(
                fd,
                msg.as_ptr().cast(),
                std::mem::size_of_val(&msg),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        n == std::mem::size_of_val(&msg) as isize
    }

    /// The boot clock in microseconds (monotonic, counting a suspend too): the clock the
    /// watchdog's deadlines are on ([`Watchdog::deadline`]). Async-signal-safe.
    fn now_micros() -> i64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes `ts`.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        // `time_t` and `c_long` are 32 bits wide on some targets.
        #[allow(clippy::unnecessary_cast)]
        let micros = ts.tv_sec as i64 * 1_000_000 + ts.tv_nsec as i64 / 1_000;
        micros
    }

    fn kill_group(pid: libc::pid_t) {
        if pid > 1 {
            // SAFETY: kill(2) with a negative pid signals that process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }

    /// The watchdog's life, in the forked child. Never returns.
    ///
    /// # Safety
    /// Only in a child just forked: it closes `close` (the worker's end), takes `fd` as its own and
    /// ends the process.
    unsafe fn watch(fd: RawFd, close: RawFd, worker: libc::pid_t) -> ! {
        libc::close(close);
        // Its own process group: a signal to the worker's (Ctrl-Z, Ctrl-C) does not reach it. It
        // leaves the worker's stdin, stdout and stderr alone but holds no copy of them, so a reader of
        // the worker's output sees it end with the worker.
        libc::setpgid(0, 0);
        // Told apart from the worker in `ps -o comm` and `top` (at most 15 bytes; its command line
        // is the worker's).
        libc::prctl(libc::PR_SET_NAME, c"fleetdb-watchdg".as_ptr());
        // It ends with the worker (its socket closing), not with a signal meant for the worker: the
        // handlers it inherited from the worker's runtime would only wake the worker.
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(sig, libc::SIG_IGN);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for std_fd in 0..3 {
                libc::dup2(null, std_fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        // The worker may have died before the socket was set up on this side.
        if libc::getppid() != worker {
            libc::_exit(0);
        }
        let mut groups = [0 as libc::pid_t; GROUPS_MAX];
        let mut n = 0usize;
        // No deadline until the worker has a session: nothing runs before.
        let mut deadline = i64::MAX;
        loop {
            let now = now_micros();
            let expired = deadline != i64::MAX && now >= deadline.saturating_sub(KILL_AHEAD_MICROS);
            if expired {
                for &g in &groups[..n] {
                    kill_group(g);
                }
                n = 0;
            }
            let wait_ms: libc::c_int = if deadline == i64::MAX || expired {
                1_000
            } else {
                // Up to the kill (rounded up), at most a second.
                let left = deadline.saturating_sub(KILL_AHEAD_MICROS) - now;
                ((left + 999) / 1_000).clamp(1, 1_000) as libc::c_int
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let r = libc::poll(&mut pfd, 1, wait_ms);
            if r <= 0 {
                continue; // timeout, or EINTR
            }
            let mut msg = [0i64; 2];
            let got = libc::recv(fd, msg.as_mut_ptr().cast(), std::mem::size_of_val(&msg), 0);
            if got == 0
                || (got < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
            {
                // The worker is gone: so are its commands.
                for &g in &groups[..n] {
                    kill_group(g);
                }
                libc::_exit(0);
            }
            if got != std::mem::size_of_val(&msg) as isize {
                continue;
            }
            match msg[0] {
                MSG_DEADLINE => {
                    deadline = msg[1].max(if deadline == i64::MAX { 0 } else { deadline })
                }
                MSG_RUN => {
                    let pid = msg[1] as libc::pid_t;
                    let expired = deadline != i64::MAX
                        && now_micros() >= deadline.saturating_sub(KILL_AHEAD_MICROS);
                    if expired {
                        kill_group(pid); // the session is gone: nothing of it may run
                    } else if n < GROUPS_MAX {
                        groups[n] = pid;
                        n += 1;
                    }
                }
                MSG_DONE => {
                    let pid = msg[1] as libc::pid_t;
                    if let Some(i) = groups[..n].iter().position(|&g| g == pid) {
                        groups[i] = groups[n - 1];
                        n -= 1;
                    }
                }
                _ => {}
            }
        }
    }
}

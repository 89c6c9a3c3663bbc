//! Reactor tests: messages, back-pressure, timers, idle sleep and wake-up, core lists.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

fn cfg() -> ReactorConfig {
    ReactorConfig {
        pin: false,
        inbox_capacity: 8,
        buf_count: 4,
        ..ReactorConfig::default()
    }
}

fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// Drives a future to completion on this thread (tests only: no tokio in the daemon core).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

#[test]
fn call_runs_on_the_reactor_and_returns_its_answer() {
    let set = ReactorSet::start(&[0, 1], &cfg()).expect("start");
    for r in set.remotes() {
        let (id, name) = r
            .call(|rx: &Reactor| (rx.id(), std::thread::current().name().map(String::from)))
            .expect("call");
        assert_eq!(id, r.id());
        assert_eq!(name.as_deref(), Some(format!("reactor{id}").as_str()));
    }
    let v = block_on(
        set.remotes()[1]
            .call_async(|rx: &Reactor| rx.id() * 10)
            .expect("send"),
    )
    .expect("answer");
    assert_eq!(v, 10);
}

#[test]
fn a_full_queue_pushes_back_and_drops_nothing() {
    let set = ReactorSet::start(&[0], &cfg()).expect("start");
    let r = &set.remotes()[0];
    let (hold_tx, hold_rx) = crossbeam::channel::bounded::<()>(0);
    let (parked_tx, parked_rx) = crossbeam::channel::bounded::<()>(1);
    // Park the reactor inside a message so the queue cannot drain.
    r.send(Box::new(move |_rx: &Reactor| {
        let _ = parked_tx.send(());
        let _ = hold_rx.recv();
    }))
    .expect("send");
    parked_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("reactor parked");
    let ran = Arc::new(AtomicUsize::new(0));
    let mut refused = 0;
    let mut accepted = 0;
    for _ in 0..20 {
        let ran2 = Arc::clone(&ran);
        match r.try_send(Box::new(move |_rx: &Reactor| {
            ran2.fetch_add(1, Ordering::SeqCst);
        })) {
            Ok(()) => accepted += 1,
            Err((_msg, None)) => refused += 1,
            Err((_, Some(e))) => panic!("reactor stopped: {e}"),
        }
    }
    assert_eq!(
        accepted, 8,
        "capacity is 8 (the held message was already taken off)"
    );
    assert_eq!(refused, 12);
    // A blocking send waits for room instead of dropping.
    let ran2 = Arc::clone(&ran);
    let sender = std::thread::spawn({
        let r = r.clone();
        move || {
            r.send(Box::new(move |_rx: &Reactor| {
                ran2.fetch_add(1, Ordering::SeqCst);
            }))
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !sender.is_finished(),
        "send must wait while the queue is full"
    );
    hold_tx.send(()).expect("release");
    sender.join().expect("join").expect("send");
    assert!(wait_until(Duration::from_secs(5), || ran
        .load(Ordering::SeqCst)
        == 9));
}

#[test]
fn timers_fire_in_deadline_order_and_cancel() {
    let set = ReactorSet::start(&[0], &cfg()).expect("start");
    let (tx, rx_order) = crossbeam::channel::unbounded();
    set.remotes()[0]
        .call(move |rx: &Reactor| {
            for (i, ms) in [(1u32, 30u64), (2, 10), (3, 20)] {
                let tx = tx.clone();
                rx.add_timer(
                    Duration::from_millis(ms),
                    Box::new(move |_| tx.send(i).expect("send")),
                );
            }
            let tx2 = tx.clone();
            let id = rx.add_timer(
                Duration::from_millis(5),
                Box::new(move |_| tx2.send(99).expect("send")),
            );
            assert!(rx.cancel_timer(id));
            let ticks = Arc::new(AtomicUsize::new(0));
            let t2 = Arc::clone(&ticks);
            rx.add_periodic(Duration::from_millis(2), move |_| {
                if t2.fetch_add(1, Ordering::SeqCst) == 4 {
                    tx.send(100).expect("send");
                }
            });
        })
        .expect("call");
    let got: Vec<u32> = (0..4)
        .map(|_| {
            rx_order
                .recv_timeout(Duration::from_secs(5))
                .expect("timer")
        })
        .collect();
    let mut firsts: Vec<u32> = got.iter().copied().filter(|&v| v != 100).collect();
    assert_eq!(firsts.len(), 3, "{got:?}");
    assert!(
        got.contains(&100),
        "periodic poller ran five times: {got:?}"
    );
    firsts.dedup();
    assert_eq!(firsts, vec![2, 3, 1]);
}

#[test]
fn an_idle_reactor_sleeps_and_a_message_wakes_it_quickly() {
    let set = ReactorSet::start(&[0], &cfg()).expect("start");
    let stats = Arc::clone(&set.stats()[0]);
    assert!(wait_until(Duration::from_secs(5), || stats
        .sleeps
        .load(Ordering::SeqCst)
        > 0));
    std::thread::sleep(Duration::from_millis(50));
    let enters_before = stats.enters.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let enters_idle = stats.enters.load(Ordering::SeqCst) - enters_before;
    assert!(
        enters_idle <= 2,
        "an idle reactor must not spin: {enters_idle} enters in 100 ms"
    );
    let t = Instant::now();
    set.remotes()[0].call(|_rx: &Reactor| ()).expect("call");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "wake-up took {:?}",
        t.elapsed()
    );
}

#[test]
fn core_lists_parse_and_bad_ones_say_why() {
    assert_eq!(parse_core_list("0").expect("ok"), vec![0]);
    assert_eq!(parse_core_list("0-2,5").expect("ok"), vec![0, 1, 2, 5]);
    for bad in ["", "a", "1-0", "0,0", "0,,1", "-1"] {
        let e = parse_core_list(bad).expect_err(bad).to_string();
        assert!(e.contains("invalid core list"), "{e}");
    }
    assert_eq!(format_cores(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    let e = ReactorSet::start(&[4095], &ReactorConfig::default()).expect_err("core 4095");
    assert!(e.to_string().contains("not available"), "{e}");
}

#[test]
fn stopping_a_set_joins_its_threads_and_fails_later_sends() {
    let mut set = ReactorSet::start(&[0], &cfg()).expect("start");
    let r = set.remotes()[0].clone();
    set.shutdown();
    assert!(r.call(|_rx: &Reactor| ()).is_err());
}

struct Done(crossbeam::channel::Sender<IoResult>);
impl Completion for Done {
    fn complete(&self, _rx: &Reactor, _tag: u64, res: IoResult, _buf: Option<IoBuf>) {
        let _ = self.0.send(res);
    }
}

/// A read on an empty pipe forced into io_uring's workers (IOSQE_ASYNC) stands in for a
/// long fsync/fallocate: while only such a "slow" op is outstanding the reactor must sleep,
/// not spin; its completion still wakes the reactor and reaches the caller.
fn thread_cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// One reactor that would poll fast IO for 10 s, its thread id, and a pipe (read end,
/// write end) whose reads stand in for a device.
fn reactor_and_pipe(poll_max_gap_us: u64) -> (ReactorSet, i32, [i32; 2]) {
    let set = ReactorSet::start(
        &[0],
        &ReactorConfig {
            busy_poll_limit_us: 10_000_000,
            poll_max_gap_us,
            ..cfg()
        },
    )
    .expect("start");
    let tid = set.remotes()[0]
        // SAFETY: gettid has no arguments and cannot fail.
        .call(|_rx: &Reactor| unsafe { libc::gettid() })
        .expect("tid");
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the live local array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (set, tid, fds)
}

#[test]
fn a_reactor_sleeps_while_only_slow_ops_are_in_flight() {
    // A fast op in flight would keep this reactor polling for 10 s; a slow one must not.
    let (set, tid, fds) = reactor_and_pipe(ReactorConfig::default().poll_max_gap_us);
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    let read_fd = fds[0];
    set.remotes()[0]
        .call(move |rx: &Reactor| {
            let buf = IoBuf::alloc(8);
            let mut buf = buf;
            let ptr = buf.mem_ptr().expect("heap memory");
            let sqe = opcode::Read::new(types::Fd(read_fd), ptr, 8)
                .build()
                .flags(squeue::Flags::ASYNC);
            // `buf` moves into the request slot until the completion is reaped; the pipe
            // stays open until the test has the result.
            // SAFETY: the read's buffer and descriptor outlive it (above).
            let r = unsafe { rx.submit(sqe, OpKind::Slow, Rc::new(Done(tx)), 7, Some(buf)) };
            assert!(r.is_ok());
        })
        .expect("call");
    std::thread::sleep(Duration::from_millis(50));
    let cpu0 = thread_cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(300));
    let cpu = thread_cpu_ticks(tid) - cpu0;
    let early = rx_done.try_recv();
    // Complete the read before asserting, so a failure cannot leave the reactor waiting.
    // SAFETY: writes 8 bytes from a live local array into the pipe's write end.
    let n = unsafe { libc::write(fds[1], [1u8; 8].as_ptr().cast(), 8) };
    assert_eq!(n, 8);
    assert!(
        cpu <= 2,
        "reactor spun with only a slow op in flight: {cpu} ticks of 1/100 s in 300 ms"
    );
    assert!(
        early.is_err(),
        "the read cannot have completed before the write"
    );
    let res = rx_done
        .recv_timeout(Duration::from_secs(5))
        .expect("completion delivered");
    assert_eq!(res, Ok(8));
    // SAFETY: closes the two descriptors this test opened, once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[test]
fn the_poll_policy_learns_the_gap_per_kind_of_wait() {
    let mut p = PollPolicy::new(30);
    assert_eq!(p.plan(true), IdlePlan::Poll, "polls at first");
    for _ in 0..60 {
        p.observe(true, Duration::from_millis(2));
    }
    assert_eq!(
        p.plan(true),
        IdlePlan::Sleep,
        "a 2 ms device: {:?}",
        p.gap(true)
    );
    assert_eq!(p.plan(false), IdlePlan::Poll, "the other kind is untouched");
    assert_eq!(
        p.poll_window(false),
        Some(Duration::from_micros(60)),
        "a poll with no history waits twice poll_max_gap_us for work"
    );
    // A 200 µs device: nap for half of it, then poll until twice it.
    for _ in 0..60 {
        p.observe(true, Duration::from_micros(200));
    }
    match p.plan(true) {
        IdlePlan::Nap(nap, until) => {
            assert!(nap >= Duration::from_micros(95) && nap <= Duration::from_micros(110));
            assert!(until >= nap * 4 && until <= nap * 4 + Duration::from_nanos(4));
        }
        other => panic!("a 200 µs device: {other:?} ({:?})", p.gap(true)),
    }
    // A few quick answers bring polling back; one does not undo a long history.
    let mut n = 0;
    while p.plan(true) != IdlePlan::Poll {
        p.observe(true, Duration::from_micros(5));
        n += 1;
        assert!(
            n < 30,
            "still not polling after {n} quick answers: {:?}",
            p.gap(true)
        );
    }
    assert!(n >= 2, "{n}");
    // Polling again, the window is 4 x the learned gap (at least 60 µs).
    let w = p.poll_window(true).expect("the policy is on");
    assert_eq!(w, (p.gap(true) * 4).max(Duration::from_micros(60)), "{w:?}");
    for _ in 0..60 {
        p.observe(true, Duration::from_micros(25));
    }
    let w = p.poll_window(true).expect("the policy is on");
    assert!(
        w > Duration::from_micros(90) && w <= Duration::from_micros(101),
        "a 25 µs device polls up to ~100 µs: {w:?}"
    );
    // One long idle period makes a busy queue nap, not sleep, and only for a few requests.
    for _ in 0..60 {
        p.observe(false, Duration::from_micros(3));
    }
    p.observe(false, Duration::from_secs(10));
    assert!(
        matches!(p.plan(false), IdlePlan::Nap(..)),
        "{:?}",
        p.gap(false)
    );
    let mut n = 0;
    while p.plan(false) != IdlePlan::Poll {
        p.observe(false, Duration::from_micros(3));
        n += 1;
        assert!(n < 30, "{n}: {:?}", p.gap(false));
    }
    // 0 turns the policy off: always poll.
    let mut off = PollPolicy::new(0);
    off.observe(true, Duration::from_secs(1));
    assert_eq!(off.plan(true), IdlePlan::Poll);
    assert_eq!(
        off.poll_window(true),
        None,
        "off: the configured limits alone"
    );
}

/// Reads of a pipe another thread writes every 2 ms, submitted as fast IO: a device that
/// answers in 2 ms. Resubmits until `left` runs out, then reports.
struct SlowDevice {
    fd: i32,
    left: Cell<u32>,
    done: crossbeam::channel::Sender<()>,
}

impl SlowDevice {
    fn submit(self: &Rc<Self>, rx: &Reactor) {
        let mut buf = IoBuf::alloc(8);
        let ptr = buf.mem_ptr().expect("heap memory");
        let sqe = opcode::Read::new(types::Fd(self.fd), ptr, 8).build();
        // `buf` moves into the request slot until the completion is reaped; the pipe stays
        // open until the test has its result.
        // SAFETY: the read's buffer and descriptor outlive it (above).
        let r = unsafe { rx.submit(sqe, OpKind::Fast, Rc::clone(self) as _, 0, Some(buf)) };
        assert!(r.is_ok());
    }
}

impl Completion for SlowDevice {
    fn complete(&self, rx: &Reactor, _tag: u64, res: IoResult, _buf: Option<IoBuf>) {
        assert_eq!(res, Ok(8));
        let left = self.left.get() - 1;
        self.left.set(left);
        if left == 0 {
            let _ = self.done.send(());
        } else {
            let me = Rc::new(SlowDevice {
                fd: self.fd,
                left: Cell::new(left),
                done: self.done.clone(),
            });
            me.submit(rx);
        }
    }
}

/// CPU ticks (1/100 s) reactor 0 used while serving 150 reads of a 2 ms device, after 30
/// reads of warm-up.
fn cpu_serving_a_slow_device(poll_max_gap_us: u64) -> u64 {
    let (set, tid, fds) = reactor_and_pipe(poll_max_gap_us);
    let (tx, done) = crossbeam::channel::bounded(1);
    let read_fd = fds[0];
    set.remotes()[0]
        .call(move |rx: &Reactor| {
            Rc::new(SlowDevice {
                fd: read_fd,
                left: Cell::new(180),
                done: tx,
            })
            .submit(rx);
        })
        .expect("call");
    let write_fd = fds[1];
    let mut cpu0 = 0;
    for i in 0..180 {
        if i == 30 {
            cpu0 = thread_cpu_ticks(tid);
        }
        std::thread::sleep(Duration::from_millis(2));
        // SAFETY: writes 8 bytes from a live local array into the pipe's write end.
        let n = unsafe { libc::write(write_fd, [1u8; 8].as_ptr().cast(), 8) };
        assert_eq!(n, 8);
    }
    done.recv_timeout(Duration::from_secs(10))
        .expect("every read completed");
    let cpu = thread_cpu_ticks(tid) - cpu0;
    drop(set);
    // SAFETY: closes the two descriptors this function opened, once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    cpu
}

#[test]
fn a_reactor_sleeps_through_a_slow_devices_fast_ops_once_it_has_learned_the_gap() {
    // Over the ~300 ms measured, a polling reactor spins throughout; a hybrid one wakes
    // 150 times. Control first: with the policy off it does spin, so the measurement can
    // tell the two apart on this machine.
    let spin = cpu_serving_a_slow_device(0);
    let hybrid = cpu_serving_a_slow_device(DEFAULT_POLL_MAX_GAP_US);
    eprintln!("2 ms device, ~300 ms: polling {spin} ticks, hybrid {hybrid} ticks (1/100 s)");
    assert!(
        spin >= 8,
        "control: a reactor polling 2 ms IO used only {spin} ticks of 1/100 s in ~300 ms"
    );
    assert!(
        hybrid <= 3,
        "the hybrid reactor used {hybrid} ticks of 1/100 s in ~300 ms (polling used {spin})"
    );
}

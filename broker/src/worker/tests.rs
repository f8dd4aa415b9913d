use super::*;

#[test]
fn clean_strips_control_chars_and_caps_length() {
    assert_eq!(clean("a\x1b[2Jb\nc"), "a?[2Jb?c");
    let long = "x".repeat(MAX_WORKER_TEXT + 10);
    assert_eq!(clean(&long).chars().count(), MAX_WORKER_TEXT + 1);
}

#[test]
fn worker_conn_times_out_and_refuses_fds() {
    let (a, b) = UnixStream::pair().unwrap();
    let conn = WorkerConn::new(a, 42, Duration::from_millis(100)).unwrap();
    assert!(matches!(
        conn.recv(),
        Err(WorkerError::Timeout { pid: 42, .. })
    ));
    let f = File::open("/dev/null").unwrap();
    frame::send_on(&b, &FromWorker::Ok, &[f.as_fd()]).unwrap();
    assert!(matches!(conn.recv(), Err(WorkerError::Protocol { .. })));
}

#[test]
fn worker_conn_refuses_wrong_and_unsolicited_answers() {
    let (a, b) = UnixStream::pair().unwrap();
    let conn = WorkerConn::new(a, 9, Duration::from_secs(5)).unwrap();
    // Serving is no answer to Stats.
    let fake = std::thread::spawn(move || {
        let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
        frame::send_on(&b, &FromWorker::Serving, &[]).unwrap();
        b
    });
    let err = conn.call(&ToWorker::Stats, &[]).unwrap_err().to_string();
    assert!(err.contains("answered Serving to Stats"), "{err}");
    let b = fake.join().unwrap();
    // Something said before the broker asks is never taken as the answer.
    frame::send_on(&b, &FromWorker::Ok, &[]).unwrap();
    let err = conn.call(&ToWorker::Pause, &[]).unwrap_err().to_string();
    assert!(err.contains("unsolicited"), "{err}");
    // A quiet worker answering in turn is fine.
    let (a, b) = UnixStream::pair().unwrap();
    let conn = WorkerConn::new(a, 9, Duration::from_secs(5)).unwrap();
    let fake = std::thread::spawn(move || {
        let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
        frame::send_on(&b, &FromWorker::Ok, &[]).unwrap();
    });
    assert_eq!(conn.call(&ToWorker::Pause, &[]).unwrap(), FromWorker::Ok);
    fake.join().unwrap();
}

#[test]
fn slow_parent_rounds_cannot_stretch_an_open_past_the_operation_deadline() {
    let (a, b) = UnixStream::pair().unwrap();
    // Each round comes well within the 1 s per-message timeout.
    let conn = WorkerConn::new(a, 5, Duration::from_secs(1))
        .unwrap()
        .with_op_timeout(Duration::from_millis(1500));
    let fake = std::thread::spawn(move || {
        let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
        let need = FromWorker::NeedParent {
            child: "/srv/a/leaf".into(),
            locators: vec![],
            parent_uuid: [0; 16],
        };
        let mut rounds = 0;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            if frame::send_on(&b, &need, &[]).is_err()
                || frame::recv_on::<_, ToWorker>(&b, 1 << 16).is_err()
            {
                return rounds;
            }
            rounds += 1;
        }
    });
    let leaf = File::open("/dev/null").unwrap();
    let msg = ToWorker::Open {
        kind: tapjail_common::proto::ImageKind::Aio,
        name: "/srv/a/leaf".into(),
        read_only: true,
    };
    let t0 = Instant::now();
    let err = conn
        .open_chain(&msg, &leaf, &mut |_| Err("no".into()))
        .unwrap_err();
    let took = t0.elapsed();
    assert!(
        matches!(err, WorkerError::OperationTimeout { pid: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("operation_timeout_secs"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(conn);
    let rounds = fake.join().unwrap();
    assert!((3..=6).contains(&rounds), "{rounds} rounds");
}

#[test]
fn open_chain_answers_parent_requests_then_returns_opened() {
    let (a, b) = UnixStream::pair().unwrap();
    let conn = WorkerConn::new(a, 1, Duration::from_secs(5)).unwrap();
    let fake = std::thread::spawn(move || {
        let (_m, fds): (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
        assert_eq!(fds.len(), 1);
        let need = FromWorker::NeedParent {
            child: "/srv/a/leaf".into(),
            locators: vec![ParentLocator {
                code: "W2ru".into(),
                path: "base".into(),
                relative: true,
            }],
            parent_uuid: [0; 16],
        };
        frame::send_on(&b, &need, &[]).unwrap();
        let (m, fds): (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
        assert_eq!(m, ToWorker::Parent(Ok("/srv/a/base".into())));
        assert_eq!(fds.len(), 1);
        frame::send_on(&b, &need, &[]).unwrap();
        let (m, fds): (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
        assert_eq!(m, ToWorker::Parent(Err("no".into())));
        assert!(fds.is_empty());
        let opened = FromWorker::Opened {
            virtual_size: 4096,
            chain: vec!["leaf\x07".into()],
        };
        frame::send_on(&b, &opened, &[]).unwrap();
    });
    let leaf = File::open("/dev/null").unwrap();
    let mut n = 0;
    let msg = ToWorker::Open {
        kind: tapjail_common::proto::ImageKind::Aio,
        name: "/srv/a/leaf".into(),
        read_only: true,
    };
    let opened = conn
        .open_chain(&msg, &leaf, &mut |req| {
            n += 1;
            assert_eq!(req.child, "/srv/a/leaf");
            if n == 1 {
                Ok(("/srv/a/base".into(), File::open("/dev/null").unwrap()))
            } else {
                Err("no".into())
            }
        })
        .unwrap();
    assert_eq!(opened.virtual_size, 4096);
    assert_eq!(opened.chain, vec!["leaf?".to_string()]);
    fake.join().unwrap();
}

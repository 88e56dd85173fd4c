//! AriClient and EventStream against the fake Asterisk: every REST call, each error kind,
//! reconnects, replacement, a stalled consumer losing nothing, and the connection bound.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use ivr_core::ari::{
    AriClient, AriConfig, AriError, AriEvent, ChannelState, EventStream, OriginateRequest, OriginateTarget, StreamItem,
};
use ivr_core::fake::{FakeAsterisk, FakeConfig};

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("{what}: no result within {WAIT:?}"))
}

async fn fake() -> FakeAsterisk {
    FakeAsterisk::start_with(FakeConfig { time_scale: 0.02, ..FakeConfig::default() }).await.expect("fake Asterisk")
}

fn config(fake: &FakeAsterisk) -> AriConfig {
    let mut config = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
    config.request_timeout = Duration::from_secs(2);
    config.reconnect_min = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(200);
    config
}

fn originate(number: &str, channel_id: &str) -> OriginateRequest {
    OriginateRequest {
        endpoint: format!("Local/{number}@sim"),
        channel_id: channel_id.to_owned(),
        target: OriginateTarget::App { app: "ivr".into(), app_args: None },
        caller_id: Some("\"IVR Test\" <+15559990000>".into()),
        timeout_secs: Some(30),
        variables: BTreeMap::from([("IVR_CALL_ID".to_owned(), channel_id.to_owned())]),
    }
}

/// The next item that is not a routine event of no interest to the test.
async fn next_item(stream: &mut EventStream) -> StreamItem {
    within("next stream item", stream.next()).await.expect("the stream ended")
}

async fn connected(stream: &mut EventStream) -> u64 {
    loop {
        match next_item(stream).await {
            StreamItem::Connected { connection } => return connection,
            StreamItem::Event(_) | StreamItem::Disconnected { .. } | StreamItem::ConnectFailed { .. } => continue,
            other => panic!("expected a connection, got {other:?}"),
        }
    }
}

/// Events until one of `kind` for `channel_id`.
async fn until_event(stream: &mut EventStream, kind: &str, channel_id: &str) -> AriEvent {
    loop {
        if let StreamItem::Event(event) = next_item(stream).await {
            if event.kind() == kind && event.channel_id() == Some(channel_id) {
                return event;
            }
        }
    }
}

#[tokio::test]
async fn every_rest_call_against_the_fake() {
    let fake = fake().await;
    let ari = AriClient::new(config(&fake)).unwrap();
    let mut events = EventStream::connect(config(&fake)).unwrap();
    assert_eq!(connected(&mut events).await, 1);

    let info = within("info", ari.asterisk_info()).await.unwrap();
    assert!(!info.status.expect("status").startup_time.is_empty());
    let app = within("application", ari.get_application("ivr")).await.unwrap();
    assert_eq!(app.name, "ivr");

    let id = uuid::Uuid::new_v4().to_string();
    let channel = within("originate", ari.originate(&originate("+15550000001", &id))).await.unwrap();
    assert_eq!(channel.id, id);
    assert!(channel.name.starts_with("Local/+15550000001@sim-"), "{}", channel.name);
    assert_eq!(channel.state, ChannelState::Down);

    until_event(&mut events, "ChannelStateChange", &id).await;
    let ringing = within("get", ari.get_channel(&id)).await.unwrap();
    assert_eq!(ringing.state, ChannelState::Ringing);
    let all = within("list", ari.list_channels()).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    assert!(ids.contains(&id.as_str()) && ids.contains(&format!("{id};2").as_str()), "{ids:?}");

    until_event(&mut events, "StasisStart", &id).await;
    let playback = within("play", ari.play(&id, "sound:hello-world", None)).await.unwrap();
    assert_eq!((playback.state.as_str(), playback.channel_id()), ("queued", Some(id.as_str())));
    let finished = until_event(&mut events, "PlaybackFinished", &id).await;
    assert!(matches!(finished, AriEvent::PlaybackFinished { ref playback, .. } if playback.state == "done"));

    within("hangup", ari.hangup(&id)).await.unwrap();
    let destroyed = until_event(&mut events, "ChannelDestroyed", &id).await;
    assert!(matches!(destroyed, AriEvent::ChannelDestroyed { cause: 16, .. }), "{destroyed:?}");
    match within("get after end", ari.get_channel(&id)).await {
        Err(AriError::NotFound { message }) => assert_eq!(message, "Channel not found"),
        other => panic!("expected 404, got {other:?}"),
    }

    // continue into the dialplan: StasisEnd at once, and the channel still ends later.
    let id = uuid::Uuid::new_v4().to_string();
    within("originate", ari.originate(&originate("+15550000005", &id))).await.unwrap();
    until_event(&mut events, "StasisStart", &id).await;
    within("continue", ari.continue_in_dialplan(&id, "ivr-menu", "s", 1)).await.unwrap();
    until_event(&mut events, "StasisEnd", &id).await;
    until_event(&mut events, "ChannelDestroyed", &id).await;
}

/// An event far larger than one read of the socket (ari/stream.rs reads 4 KiB at a time)
/// arrives whole: here a StasisStart whose argument is 50 KB (about as long as a URI may be).
#[tokio::test]
async fn an_event_larger_than_a_read_arrives_whole() {
    let fake = fake().await;
    let ari = AriClient::new(config(&fake)).unwrap();
    let mut events = EventStream::connect(config(&fake)).unwrap();
    connected(&mut events).await;
    let id = uuid::Uuid::new_v4().to_string();
    let arg: String = (0..50_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let mut request = originate("+15550000005", &id);
    request.target = OriginateTarget::App { app: "ivr".into(), app_args: Some(arg.clone()) };
    within("originate", ari.originate(&request)).await.unwrap();
    match until_event(&mut events, "StasisStart", &id).await {
        AriEvent::StasisStart { args, .. } => assert!(args == [arg], "the argument came back changed"),
        other => panic!("expected StasisStart, got {other:?}"),
    }
}

#[tokio::test]
async fn each_error_kind_keeps_aris_status_and_message() {
    let fake = fake().await;
    let ari = AriClient::new(config(&fake)).unwrap();

    let mut bad = originate("+15550000001", "x");
    bad.endpoint = "Foo/bar".into();
    match within("500", ari.originate(&bad)).await {
        Err(e @ AriError::Status { status: 500, .. }) => assert!(e.to_string().contains("Allocation failed"), "{e}"),
        other => panic!("expected 500, got {other:?}"),
    }
    bad.endpoint = "nobody".into();
    match within("400", ari.originate(&bad)).await {
        Err(AriError::Status { status: 400, message }) => assert_eq!(message, "Invalid endpoint specified"),
        other => panic!("expected 400, got {other:?}"),
    }

    let id = uuid::Uuid::new_v4().to_string();
    within("first", ari.originate(&originate("+15550000004", &id))).await.unwrap();
    match within("409", ari.originate(&originate("+15550000004", &id))).await {
        Err(e @ AriError::Conflict { .. }) => {
            assert_eq!(e.status(), Some(409));
            assert!(e.to_string().contains("Channel with given unique ID already exists"), "{e}");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    within("hangup", ari.hangup(&id)).await.unwrap();
    assert!(matches!(within("404", ari.hangup("no-such-channel")).await, Err(AriError::NotFound { .. })));

    let mut wrong = config(&fake);
    wrong.password = "wrong-password".into();
    let unauthorized = within("401", AriClient::new(wrong).unwrap().list_channels()).await.unwrap_err();
    assert!(matches!(unauthorized, AriError::Unauthorized));
    assert!(!unauthorized.to_string().contains("wrong-password"));

    // A slow originate runs into the request timeout.
    fake.set_originate_delay(Duration::from_secs(5));
    let mut quick = config(&fake);
    quick.request_timeout = Duration::from_millis(200);
    let slow = within("timeout", AriClient::new(quick).unwrap().originate(&originate("+15550000001", "slow"))).await;
    assert!(matches!(slow, Err(AriError::Timeout(_))), "{slow:?}");
    let slow = slow.unwrap_err();
    assert!(slow.is_connection_failure() && slow.status().is_none(), "{slow:?}");

    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nowhere = AriConfig::new(format!("http://{closed}/ari"), "ivr", "ivr-secret", "ivr");
    let transport = within("refused", AriClient::new(nowhere).unwrap().list_channels()).await;
    assert!(matches!(transport, Err(AriError::Connect(_))), "{transport:?}");
    assert!(transport.unwrap_err().is_connection_failure());
}

#[tokio::test]
async fn the_stream_reconnects_after_a_dropped_socket_and_after_a_restart() {
    let fake = fake().await;
    let ari = AriClient::new(config(&fake)).unwrap();
    let mut events = EventStream::connect(config(&fake)).unwrap();
    assert_eq!(connected(&mut events).await, 1);

    fake.drop_websockets();
    loop {
        match next_item(&mut events).await {
            StreamItem::Disconnected { .. } => break,
            StreamItem::Event(_) => continue,
            other => panic!("expected a disconnect, got {other:?}"),
        }
    }
    assert_eq!(connected(&mut events).await, 2);

    // Events flow on the new socket.
    let id = uuid::Uuid::new_v4().to_string();
    within("originate", ari.originate(&originate("+15550000007", &id))).await.unwrap();
    until_event(&mut events, "StasisStart", &id).await;
    let before = within("info", ari.asterisk_info()).await.unwrap().status.unwrap().startup_time;

    within("restart", fake.restart()).await;
    let destroyed = until_event(&mut events, "ChannelDestroyed", &id).await;
    assert!(matches!(destroyed, AriEvent::ChannelDestroyed { cause: 0, .. }), "{destroyed:?}");
    assert_eq!(connected(&mut events).await, 3, "a new connection after the restart");
    let after = within("info", ari.asterisk_info()).await.unwrap().status.unwrap().startup_time;
    assert_ne!(before, after, "the startup time tells the restart");
    assert!(matches!(within("gone", ari.get_channel(&id)).await, Err(AriError::NotFound { .. })));
}

#[tokio::test]
async fn refused_credentials_are_reported_and_retried() {
    let fake = fake().await;
    fake.refuse_credentials(true);
    let mut events = EventStream::connect(config(&fake)).unwrap();
    match next_item(&mut events).await {
        StreamItem::ConnectFailed { reason, .. } => assert!(reason.contains("401"), "{reason}"),
        other => panic!("expected a failed connect, got {other:?}"),
    }
    fake.refuse_credentials(false);
    assert_eq!(connected(&mut events).await, 1);
}

/// The event types of one call to `number`, in order, until its callee half is destroyed.
async fn kinds_of_a_call(ari: &AriClient, events: &mut EventStream, number: &str) -> Vec<String> {
    let id = uuid::Uuid::new_v4().to_string();
    within("originate", ari.originate(&originate(number, &id))).await.unwrap();
    let callee = format!("{id};2");
    let mut kinds = Vec::new();
    loop {
        if let StreamItem::Event(event) = next_item(events).await {
            let Some(channel) = event.channel_id().filter(|c| c.starts_with(&id)) else { continue };
            let last = event.kind() == "ChannelDestroyed" && channel == callee;
            kinds.push(event.kind().to_owned());
            if last {
                return kinds;
            }
        }
    }
}

/// `PUT /applications/{app}/eventFilter`: once set, only the allowed types come (even
/// ApplicationReplaced is filtered, as Asterisk does); an empty list lets every type through
/// again; an application Asterisk does not know is 404.
#[tokio::test]
async fn an_event_filter_lets_only_the_allowed_types_through() {
    let fake = fake().await;
    let ari = AriClient::new(config(&fake)).unwrap();
    let mut events = EventStream::connect(config(&fake)).unwrap();
    connected(&mut events).await;
    let busy = "+15550000002";
    let everything = kinds_of_a_call(&ari, &mut events, busy).await;
    assert!(everything.iter().any(|k| k == "ChannelDialplan"), "{everything:?}");

    within("filter", ari.filter_events("ivr", &["Dial", "ChannelDestroyed"])).await.unwrap();
    let shown = fake.application("ivr").expect("the app");
    assert_eq!(shown["events_allowed"], serde_json::json!([{"type": "Dial"}, {"type": "ChannelDestroyed"}]));
    assert_eq!(shown["events_disallowed"], serde_json::json!([]));
    let filtered = kinds_of_a_call(&ari, &mut events, busy).await;
    let expected: Vec<&String> = everything.iter().filter(|k| *k == "Dial" || *k == "ChannelDestroyed").collect();
    assert_eq!(filtered.iter().collect::<Vec<_>>(), expected, "the same events, the others left out");

    // Another socket takes the app over: the old one is not told (not an allowed type).
    let mut second = EventStream::connect(config(&fake)).unwrap();
    connected(&mut second).await;
    // (The fake queues ApplicationReplaced as it takes the second socket in, before that one
    // is told it is connected: had it been sent, it would be here at once.)
    let told = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(told.is_err(), "the replaced socket heard {told:?}");
    drop(events);

    within("no filter", ari.filter_events("ivr", &[])).await.unwrap();
    assert_eq!(kinds_of_a_call(&ari, &mut second, busy).await, everything, "every type again");

    match within("unknown app", ari.filter_events("nobody", &["Dial"])).await {
        Err(AriError::NotFound { message }) => assert_eq!(message, "Application not found"),
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn a_second_socket_for_the_app_replaces_the_first() {
    let fake = fake().await;
    let mut first = EventStream::connect(config(&fake)).unwrap();
    assert_eq!(connected(&mut first).await, 1);
    let mut second = EventStream::connect(config(&fake)).unwrap();
    assert_eq!(connected(&mut second).await, 1);
    loop {
        match next_item(&mut first).await {
            StreamItem::Event(event) if event.kind() == "ApplicationReplaced" => continue,
            StreamItem::Replaced { retry_in } => {
                assert!(retry_in > Duration::ZERO);
                break;
            }
            StreamItem::Event(_) => continue,
            other => panic!("expected the first socket to be replaced, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_stalled_consumer_loses_no_event_and_keeps_the_socket() {
    const EVENTS: usize = 20_000;
    let fake = fake().await;
    let mut events = EventStream::connect(config(&fake)).unwrap();
    let stats = events.stats();
    assert_eq!(connected(&mut events).await, 1);

    // The consumer reads nothing while the fake writes every event at once.
    assert_eq!(fake.send_user_events("ivr", "load", EVENTS), EVENTS);
    // The reader keeps reading meanwhile: all of them end up queued on our side.
    within("all events read", async {
        while stats.queue_depth() < EVENTS as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let stall = Duration::from_millis(300);
    tokio::time::sleep(stall).await;
    assert_eq!(stats.queue_depth(), EVENTS as u64, "nothing else arrived, nothing was lost");

    // Then it drains: every event, in the order sent, on the same connection.
    for expected in 0..EVENTS {
        match next_item(&mut events).await {
            StreamItem::Event(AriEvent::Unknown { kind, raw }) if kind == "ChannelUserevent" => {
                assert_eq!(raw["userevent"]["seq"], expected.to_string(), "event {expected} out of order");
            }
            other => panic!("event {expected}: expected a user event, got {other:?}"),
        }
        if expected == 0 {
            assert!(stats.consumer_lag() >= stall, "the first event waited the stall out: {:?}", stats.consumer_lag());
        }
    }
    assert_eq!(stats.queue_depth(), 0);
    assert!(stats.consumed() > EVENTS as u64, "the connect and every event");
    let seen = fake.stats();
    assert_eq!((seen.write_timeouts, seen.sessions), (0, 1), "the fake kept its one socket open: {seen:?}");
    // And the socket still carries events.
    fake.send_user_events("ivr", "after", 1);
    assert!(matches!(next_item(&mut events).await, StreamItem::Event(AriEvent::Unknown { .. })));
}

/// A fake that admits `limit` HTTP sessions, with a connected event stream (one of them).
async fn limited_fake(limit: usize, max_connections: usize) -> (FakeAsterisk, AriClient, EventStream) {
    let fake = FakeAsterisk::start_with(FakeConfig { time_scale: 0.02, session_limit: limit, ..FakeConfig::default() })
        .await
        .expect("fake Asterisk");
    let mut config = config(&fake);
    config.max_connections = max_connections;
    config.request_timeout = Duration::from_secs(5);
    let mut events = EventStream::connect(config.clone()).unwrap();
    assert_eq!(connected(&mut events).await, 1);
    (fake, AriClient::new(config).unwrap(), events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_within_max_connections_and_all_succeed() {
    let (fake, ari, _events) = limited_fake(10, 10).await;
    let requests = (0..500).map(|_| ari.asterisk_info());
    let results = within("500 requests", futures_util::future::join_all(requests)).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} failed, e.g. {:?}", failed.len(), failed.first());
    let seen = fake.stats();
    assert!(seen.peak_sessions <= 10, "{seen:?}");
    assert_eq!(seen.refused_sessions, 0, "{seen:?}");
}

#[tokio::test]
async fn connections_asterisk_refuses_are_connection_failures() {
    // The client allows more connections than Asterisk admits.
    let (fake, ari, _events) = limited_fake(5, 40).await;
    let requests = (0..200).map(|_| ari.asterisk_info());
    let results = within("200 requests", futures_util::future::join_all(requests)).await;
    let failures: Vec<&AriError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!failures.is_empty(), "some connections were beyond the limit");
    for e in &failures {
        assert!(e.is_connection_failure() && e.status().is_none(), "{e:?}");
        assert!(matches!(e, AriError::Transport(_)), "closed before an answer: {e:?}");
    }
    let seen = fake.stats();
    assert!(seen.refused_sessions > 0 && seen.peak_sessions <= 5, "{seen:?}");
    // A bound of 4 REST requests + the socket within the same limit of 5 fails nothing, once
    // the unbounded client's idle connections (sessions too) are gone.
    let mut bounded = ari.config().clone();
    bounded.max_connections = 5;
    drop(ari);
    within("idle connections closed", async {
        while fake.stats().sessions > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let ari = AriClient::new(bounded).unwrap();
    let results = within("bounded", futures_util::future::join_all((0..100).map(|_| ari.asterisk_info()))).await;
    assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
}

#[test]
fn max_connections_leaves_one_for_the_websocket() {
    let mut config = AriConfig::new("http://127.0.0.1:8088/ari", "ivr", "ivr-secret", "ivr");
    assert_eq!(config.max_connections, AriConfig::DEFAULT_MAX_CONNECTIONS);
    assert!(config.max_connections < 100, "well under Asterisk's default sessionlimit");
    config.max_connections = 1;
    let e = AriClient::new(config).unwrap_err();
    assert!(e.to_string().contains("at least 2"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_given_up_half_way_do_not_open_extra_connections() {
    let (fake, ari, _events) = limited_fake(4, 4).await;
    fake.set_originate_delay(Duration::from_millis(300));
    // Three originates (every REST connection) whose callers give up at once.
    let given_up: Vec<_> = (0..3)
        .map(|i| {
            let ari = ari.clone();
            tokio::spawn(async move { ari.originate(&originate("+15550000004", &format!("given-up-{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    given_up.iter().for_each(|task| task.abort());
    let results = within("20 requests", futures_util::future::join_all((0..20).map(|_| ari.asterisk_info()))).await;
    assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
    let seen = fake.stats();
    assert!(seen.peak_sessions <= 4 && seen.refused_sessions == 0, "{seen:?}");
    // The abandoned originates were still carried out, once each.
    assert_eq!(seen.originates, 3);
}

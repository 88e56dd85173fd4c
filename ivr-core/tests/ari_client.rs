//! AriClient and EventStream against the fake Asterisk: every REST call, each error kind,
//! reconnects, replacement, and a slow consumer's loss being counted.

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

    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nowhere = AriConfig::new(format!("http://{closed}/ari"), "ivr", "ivr-secret", "ivr");
    let transport = within("refused", AriClient::new(nowhere).unwrap().list_channels()).await;
    assert!(matches!(transport, Err(AriError::Transport(_))), "{transport:?}");
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
async fn a_slow_consumer_is_told_how_many_events_it_lost() {
    let fake = fake().await;
    let ari = AriClient::new(config(&fake)).unwrap();
    let mut small = config(&fake);
    small.event_buffer = 2;
    let mut events = EventStream::connect(small).unwrap();
    assert_eq!(connected(&mut events).await, 1);

    // A whole short call's worth of events while nobody reads.
    let id = uuid::Uuid::new_v4().to_string();
    within("originate", ari.originate(&originate("+15550000006", &id))).await.unwrap();
    within("call ends", async {
        while ari.get_channel(&id).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut delivered = 0;
    let mut dropped = 0;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), events.next()).await {
        match item {
            StreamItem::Event(_) => delivered += 1,
            StreamItem::Dropped { count } => dropped += count,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered, 2, "the buffer held two events");
    assert!(dropped > 0, "the loss is counted");
}

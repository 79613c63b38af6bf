//! A hostile member and hostile load, against the real relay over real sockets: each test
//! performs one of the attacks the relay must hold against.

mod common;

use std::time::Duration;

use common::*;
use pattern_mesh_client::Client;
use pattern_mesh_core::session::Event;
use pattern_mesh_core::wire::{Body, Frame, Json, Reason, RoomConfig, Stamp};

/// The demo game's room: inputs older than 40 steps are dropped.
fn game() -> RoomConfig {
    RoomConfig {
        max_future: 1_000,
        stale_window: Some(40),
        ..RoomConfig::default()
    }
}

/// A member stamps every message about 1,000 steps ahead of the room (within `maxFuture`), as
/// fast as the rate limit lets it, while an honest member 25 ms away from the relay plays: at
/// least 99% of the honest inputs are accepted.
#[tokio::test]
async fn a_member_stamping_far_ahead_cannot_push_others_inputs_out_of_a_game_room() {
    let server = start("drag", |_| {}).await;
    let mut config = session("arena", "honest");
    config.room_config = Some(game());
    let proxy = Proxy::start_delayed(server.addr, Duration::from_millis(25)).await;
    let mut honest = Client::connect(&proxy.url(), config).await.unwrap();
    let mut hostile = join(&server, "arena", 0, None).await;
    assert_eq!(hostile.welcome.config, game());

    let attack = tokio::spawn(async move {
        // The hostile member's view of the room step: the relay adds one for each message
        // everyone receives. It stamps 990 above it (the relay allows 1,000).
        let mut room = hostile.welcome.high;
        let mut last = 0;
        let mut sent = 0u64;
        let mut refused = 0u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut tick = tokio::time::interval(Duration::from_millis(6));
        while tokio::time::Instant::now() < deadline {
            tick.tick().await;
            let step = (last + 1).max(room + 990);
            let stamp = Stamp {
                sender: hostile.node,
                step,
                pattern: hostile.pattern.value(step),
            };
            let frame = Frame::stamped(
                stamp,
                Body::Data {
                    data: Json::parse("{\"fire\":true}").unwrap(),
                },
            );
            hostile.send(&frame).await;
            last = step;
            room += 1;
            sent += 1;
            // Whatever arrived meanwhile.
            while let Ok(Ok(p)) = tokio::time::timeout(Duration::ZERO, hostile.conn.recv()).await {
                match p.frame {
                    Frame::Stamped(s) if s.stamp.step > room => room += 1,
                    Frame::Reject { .. } => {
                        refused += 1;
                        hostile.local = last;
                        hostile.send(&Frame::Fence { step: last }).await;
                    }
                    _ => {}
                }
            }
        }
        (sent, refused, last)
    });

    let inputs = 400;
    for i in 0..inputs {
        let value = serde_json::json!({ "input": i });
        honest.broadcast(Json::from_value(&value).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    honest.settled(Duration::from_secs(30)).await.unwrap();
    let (sent, hostile_refused, last) = attack.await.unwrap();
    let refused: Vec<Reason> = honest
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Refused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    let accepted = inputs - refused.len();
    let stale = refused.iter().filter(|r| **r == Reason::Stale).count();
    println!(
        "hostile: {sent} messages, {hostile_refused} refused, last step {last}; \
         honest: {accepted} of {inputs} inputs accepted, {stale} refused as stale"
    );
    assert!(sent > 500, "the attack ran ({sent} messages)");
    assert!(
        accepted * 100 >= inputs * 99,
        "{accepted} of {inputs} honest inputs accepted; {stale} of the {} refused as stale",
        refused.len()
    );
}

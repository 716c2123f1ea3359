//! Actions beyond MQTT and rules over the API, against a real regtest bitcoind and the
//! real gateway: signed webhooks to a real HTTP receiver and local programs, retried
//! until acknowledged or expired; rules added and removed over HTTP, live and across a
//! restart; payment orders refused for offline devices.

mod common;
use common::api;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bitmote_gateway::actuator::Retry;
use bitmote_gateway::{Gateway, GatewayConfig};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use hmac::{Hmac, Mac};
use serde_json::{json, Value as Json};

fn node() -> RegtestNode {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    RegtestNode::start(RegtestOptions::new(exe)).unwrap()
}

/// A gateway on free ports in `dir`, retrying every 100 ms at first, every 400 ms at most.
fn gateway(dir: &Path, node: &RegtestNode) -> (Gateway, String, String) {
    let mut cfg = GatewayConfig::new(dir);
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.anchor_poll = Duration::from_millis(100);
    cfg.actuator_retry = Retry { first: Duration::from_millis(100), max: Duration::from_millis(400) };
    // The one program rules added over the API may run (see the rules test).
    cfg.api_actions.exec_programs = vec![dir.join("ok.sh")];
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(node.client()).unwrap());
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_string();
    (gw, base, token)
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Poll the action log until `done` holds, or fail with the log after 60 s.
fn wait_actions(base: &str, what: &str, done: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = api("GET", &format!("{base}/v1/actions"), None, None).1;
        if done(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what}: {log:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn action<'a>(log: &'a Json, event_id: &str) -> &'a Json {
    log["actions"].as_array().unwrap().iter().find(|a| a["event_id"] == event_id).unwrap_or(&Json::Null)
}

/// What the webhook receiver got: headers and body of each request, per path.
type Received = Arc<Mutex<Vec<(String, HeaderMap, String)>>>;

/// A real HTTP receiver: `/flaky` answers 500, then hangs past the client's timeout, then
/// 200; `/down` always answers 503.
fn receiver(rt: &tokio::runtime::Runtime) -> (SocketAddr, Received) {
    let got: Received = Default::default();
    let g = got.clone();
    let handler = move |path: axum::extract::Path<String>, headers: HeaderMap, body: String| {
        let g = g.clone();
        async move {
            let n = {
                let mut g = g.lock().unwrap();
                g.push((path.0.clone(), headers, body));
                g.iter().filter(|(p, ..)| *p == path.0).count()
            };
            match (path.0.as_str(), n) {
                ("flaky", 1) => StatusCode::INTERNAL_SERVER_ERROR,
                ("flaky", 2) => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    StatusCode::OK
                }
                ("flaky", _) => StatusCode::NO_CONTENT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            }
        }
    };
    let app = axum::Router::new().route("/{path}", axum::routing::post(handler));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    (addr, got)
}

#[test]
fn webhooks_and_programs_are_retried_until_acknowledged_or_expired() {
    let node = node();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (hooks, received) = receiver(&rt);
    write_mode(&d.join("hook.secret"), "top-secret\n", 0o600);
    // A program that fails, then hangs past its timeout, then succeeds; it keeps what it got.
    let script = d.join("act.sh");
    write_mode(
        &script,
        &format!(
            "#!/bin/sh\nn=$(($(cat {d}/count 2>/dev/null || echo 0) + 1))\necho $n > {d}/count\ncat > {d}/stdin.$n\necho \"$BITMOTE_EVENT_ID $1\" > {d}/env.$n\n\
             case $n in 1) exit 3;; 2) exec sleep 30;; esac\nexit 0\n",
            d = d.display()
        ),
        0o755,
    );
    let h = node.client().tip().unwrap().height + 1;
    let hook = |path: &str| {
        format!("webhook = {{ url = \"http://{hooks}/{path}\", secret_file = \"{}\", timeout_secs = 1 }}", d.join("hook.secret").display())
    };
    std::fs::write(
        d.join("rules.toml"),
        format!(
            "[[rule]]\nid = \"hook\"\ndevice = \"door-1\"\ntrigger = {{ kind = \"height\", height = {h} }}\naction = {{ command = \"open\", args = {{ seconds = 5 }}, {} }}\n\n\
             [[rule]]\nid = \"dead\"\ndevice = \"door-2\"\ntrigger = {{ kind = \"height\", height = {h} }}\naction = {{ command = \"open\", {} }}\nttl_secs = 2\n\n\
             [[rule]]\nid = \"prog\"\ndevice = \"relay-3\"\ntrigger = {{ kind = \"height\", height = {h} }}\naction = {{ command = \"on\", exec = {{ program = \"{}\", args = [\"relay-3\"], timeout_secs = 1 }} }}\n",
            hook("flaky"),
            hook("down"),
            script.display()
        ),
    )
    .unwrap();
    let (gw, base, token) = gateway(d, &node);
    // The loop answers API calls once it follows the chain: the next block is its.
    let (code, list) = api("GET", &format!("{base}/v1/rules"), Some(&token), None);
    assert_eq!((code, list["rules"].as_array().map(Vec::len)), (200, Some(3)), "{list}");
    node.mine(1).unwrap();
    let (hook_id, dead_id, prog_id) = (format!("hook:height:{h}"), format!("dead:height:{h}"), format!("prog:height:{h}"));
    let log = wait_actions(&base, "the webhook and the program acknowledged, the dead webhook expired", |log| {
        action(log, &hook_id)["state"] == "acked"
            && action(log, &prog_id)["state"] == "acked"
            && action(log, &dead_id)["state"] == "expired"
    });

    // Anonymous readers see how actions are delivered, not where to (issue #13, item 8):
    // no webhook URL, secret file, program or argument anywhere in the public log, nor in
    // the dashboard; the admin sees them.
    let public = log.to_string();
    for secret in [hooks.to_string(), d.join("hook.secret").display().to_string(), "[\"relay-3\"]".into(), script.display().to_string()] {
        assert!(!public.contains(&secret), "{secret} in the public action log: {public}");
    }
    assert_eq!(action(&log, &hook_id)["delivery"]["webhook"], "<redacted: admin only>");
    let dash = api("GET", &format!("{base}/v1/dashboard"), None, None).1.to_string();
    assert!(!dash.contains(&hooks.to_string()) && !dash.contains("hook.secret"), "{dash}");
    let log = api("GET", &format!("{base}/v1/actions"), Some(&token), None).1;
    assert!(action(&log, &hook_id)["delivery"]["webhook"]["url"].as_str().unwrap().contains("/flaky"), "{log}");
    assert!(action(&log, &prog_id)["delivery"]["exec"]["program"].is_string(), "{log}");

    // The webhook: three attempts (an error, a hang cut by the timeout, a 204), each with
    // the same event id and a valid signature over timestamp and body.
    let hook = action(&log, &hook_id);
    assert_eq!(hook["attempts"], 3, "{hook}");
    assert!(hook["note"].as_str().unwrap().contains("/flaky"), "the last failure is on record: {hook}");
    let got: Vec<_> = received.lock().unwrap().iter().filter(|(p, ..)| p == "flaky").cloned().collect();
    assert_eq!(got.len(), 3);
    for (_, headers, body) in &got {
        let header = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_string();
        assert_eq!(header("x-bitmote-event"), hook_id);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"top-secret").unwrap();
        mac.update(format!("{}.{body}", header("x-bitmote-timestamp")).as_bytes());
        assert_eq!(header("x-bitmote-signature"), format!("sha256={}", hex::encode(mac.finalize().into_bytes())));
        let v: Json = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["event_id"].as_str(), v["rule"].as_str(), v["device"].as_str()),
            (Some(hook_id.as_str()), Some("hook"), Some("door-1"))
        );
        assert_eq!((v["command"].as_str(), v["args"]["seconds"].as_u64(), v["height"].as_u64()), (Some("open"), Some(5), Some(h as u64)));
    }
    // The receiver that never answers 2xx: tried until the TTL passed, then expired with an alert.
    let dead = action(&log, &dead_id);
    assert!(dead["attempts"].as_u64().unwrap() >= 2, "{dead}");
    assert!(log["alerts"].as_array().unwrap().iter().any(|a| a.as_str().unwrap().contains(&dead_id)), "{log:#}");
    assert!(received.lock().unwrap().iter().filter(|(p, ..)| p == "down").all(|(_, h, _)| h["x-bitmote-event"] == dead_id.as_str()));

    // The program: exit 3, killed after its timeout, exit 0; the action JSON on stdin and
    // the event id in the environment every time.
    let prog = action(&log, &prog_id);
    assert_eq!(prog["attempts"], 3, "{prog}");
    for n in 1..=3 {
        let stdin: Json = serde_json::from_str(&std::fs::read_to_string(d.join(format!("stdin.{n}"))).unwrap()).unwrap();
        assert_eq!((stdin["event_id"].as_str(), stdin["command"].as_str()), (Some(prog_id.as_str()), Some("on")));
        assert_eq!(std::fs::read_to_string(d.join(format!("env.{n}"))).unwrap().trim(), format!("{prog_id} relay-3"));
    }
    assert_eq!(std::fs::read_to_string(d.join("count")).unwrap().trim(), "3", "not run again once acknowledged");
    gw.shutdown();
}

#[test]
fn rules_are_managed_over_the_api_live_and_across_restarts_and_orders_need_an_online_device() {
    let node = node();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_mode(&d.join("hook.secret"), "k", 0o600);
    std::fs::write(d.join("rules.toml"), "[[rule]]\nid = \"lease\"\ndevice = \"relay-2\"\ntrigger = { kind = \"height\", height = 100000 }\naction = { command = \"off\" }\n").unwrap();
    let (gw, base, token) = gateway(d, &node);
    let rules = format!("{base}/v1/rules");
    let t = Some(token.as_str());
    let h = node.client().tip().unwrap().height + 1;
    // A program that always succeeds: the rule's action is observable without a device.
    write_mode(&d.join("ok.sh"), "#!/bin/sh\ncat > /dev/null\n", 0o755);
    let rule = json!({
        "id": "api-1", "device": "relay-5",
        "trigger": { "kind": "height", "height": h },
        "action": { "command": "on", "exec": { "program": d.join("ok.sh") } },
    });

    // Admin only; validated like the file, with a message that says what is wrong.
    assert_eq!(api("GET", &rules, None, None).0, 401);
    assert_eq!(api("POST", &rules, Some("wrong"), Some(rule.clone())).0, 401);
    let mut bad = rule.clone();
    bad["trigger"] = json!({ "kind": "payment", "address": "bc1qnotregtest", "min_sat": 1000 });
    let (code, body) = api("POST", &rules, t, Some(bad));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("address"), "{body}");
    let mut typo = rule.clone();
    typo["ttl_sec"] = json!(5);
    let (code, body) = api("POST", &rules, t, Some(typo));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("ttl_sec"), "{body}");
    let mut reserved = rule.clone();
    reserved["id"] = json!("order-77");
    assert_eq!(api("POST", &rules, t, Some(reserved)).0, 400);
    // The admin token is not a shell (issue #13, item 5): a rule or an order from the API
    // may run only a program the configuration allows, and read no secret file it does not
    // name; refused with 403 and why, and nothing is stored.
    let mut shell = rule.clone();
    shell["id"] = json!("shell");
    shell["action"]["exec"] = json!({ "program": "/bin/sh", "args": ["-c", "touch /tmp/pwned"] });
    let (code, body) = api("POST", &rules, t, Some(shell.clone()));
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("api_exec_programs"), "{body}");
    let mut in_revert = rule.clone();
    in_revert["id"] = json!("shell-2");
    in_revert["revert"] = shell["action"].clone();
    assert_eq!(api("POST", &rules, t, Some(in_revert)).0, 403);
    let mut reader = rule.clone();
    reader["id"] = json!("reader");
    reader["action"] = json!({ "command": "on", "webhook": { "url": "http://127.0.0.1:9/x", "secret_file": d.join("hook.secret") } });
    let (code, body) = api("POST", &rules, t, Some(reader));
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("api_webhook_secret_files"), "{body}");
    let shell_order = json!({ "min_sat": 20000, "action": shell["action"].clone() });
    let (code, body) = api("POST", &format!("{base}/v1/devices/lock-9/orders"), t, Some(shell_order));
    assert_eq!(code, 403, "{body}");

    // Added, listed with where it comes from, and watched from the next block on.
    let (code, body) = api("POST", &rules, t, Some(rule.clone()));
    assert_eq!(code, 201, "{body}");
    assert_eq!(api("POST", &rules, t, Some(rule.clone())).0, 409, "ids are unique");
    let mut same_as_file = rule.clone();
    same_as_file["id"] = json!("lease");
    assert_eq!(api("POST", &rules, t, Some(same_as_file)).0, 409, "also against rules.toml");
    let (_, list) = api("GET", &rules, t, None);
    let sources: Vec<(&str, &str)> =
        list["rules"].as_array().unwrap().iter().map(|r| (r["id"].as_str().unwrap(), r["source"].as_str().unwrap())).collect();
    assert_eq!(sources, vec![("lease", "file"), ("api-1", "api")]);
    node.mine(1).unwrap();
    let api_event = format!("api-1:height:{h}");
    wait_actions(&base, "the rule added over the API fired", |log| action(log, &api_event)["state"] == "acked");

    // Orders: refused while the device is offline; invalid ones refused before anything else.
    let orders = format!("{base}/v1/devices/lock-9/orders");
    let order = json!({ "min_sat": 20000, "action": { "command": "unlock" }, "revert": { "command": "lock" }, "ttl_secs": 600 });
    assert_eq!(api("POST", &orders, None, Some(order.clone())).0, 401);
    let (code, body) = api("POST", &orders, t, Some(order.clone()));
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "device lock-9 is offline");
    let mut zero_conf = order.clone();
    zero_conf["confirmations"] = json!(0);
    let (code, body) = api("POST", &orders, t, Some(zero_conf));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("confirmations = 0"), "{body}");

    // Removing: only API rules; a removed rule is gone for good, the others survive a restart.
    assert_eq!(api("DELETE", &format!("{rules}/lease"), t, None).0, 409);
    assert_eq!(api("DELETE", &format!("{rules}/nope"), t, None).0, 404);
    let mut second = rule.clone();
    second["id"] = json!("api-2");
    assert_eq!(api("POST", &rules, t, Some(second)).0, 201);
    let (code, body) = api("DELETE", &format!("{rules}/api-2"), t, None);
    assert_eq!((code, body["removed"]["id"].as_str()), (200, Some("api-2")));
    gw.shutdown();
    let (gw, base, token) = gateway(d, &node);
    let (_, list) = api("GET", &format!("{base}/v1/rules"), Some(&token), None);
    let ids: Vec<&str> = list["rules"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["lease", "api-1"]);
    let log = wait_actions(&base, "the action log after the restart", |log| action(log, &api_event)["state"] == "acked");
    assert_eq!(action(&log, &api_event)["attempts"], 1, "acknowledged once, not redelivered after the restart: {log}");
    gw.shutdown();
}

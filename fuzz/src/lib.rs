//! Support for the fuzz targets: the tick record (`bitmote_pay::tick`) and the MQTT front's
//! packet checks (`bitmote_gateway::mqtt_wire`) compiled from the crates' own source files,
//! because depending on bitmote-pay or bitmote-gateway would build ldk-node (a long nightly
//! build, for parsers that do not use it). These files use nothing else of their crates
//! (`tick` needs `tariff` and `hexs`, included the same way), so the fuzzed code is the
//! shipped code.
#![allow(dead_code, unused_imports)]

#[path = "../../crates/pay/src/hexs.rs"]
pub mod hexs;
#[path = "../../crates/pay/src/tariff.rs"]
pub mod tariff;
#[path = "../../crates/pay/src/tick.rs"]
pub mod tick;
#[path = "../../crates/gateway/src/mqtt_wire.rs"]
pub mod mqtt_wire;

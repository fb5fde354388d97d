//! The daemon's control requests, carried out against a kernel kept in
//! memory: what reaches the classifier's maps, what the config file says
//! after, and that a request the kernel or the checks refuse changes
//! nothing. No root, no network.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::{Counters, FAMILY_V4, FlowKey, RuleAction};
use tokio::sync::watch;

use super::{Daemon, Parts, Reporter};
use crate::compile::MapImage;
use crate::config::Config;
use crate::control::{ClassifierCounters, ProgramStatsView, Request, Response, TunView, UplinkView};
use crate::engine::{
    EncapTable, Engine, FlowPins, KernelTables, MemoryEncap, MemoryNat, MemoryPins, MonitorChooser, NatTable,
    Routes, SharedTables,
};
use crate::liveness::Liveness;
use crate::monitor::MonitorLink;
use crate::names::NameRules;
use crate::overlay::{LocalAddresses, OverlayManager};
use crate::platform::{DnsInterception, Heartbeat, InterceptSettings, Kernel, MonitorEvents, PlatformError};
use crate::rule_spec::RuleSpec;

/// What the classifier's maps were last brought to, and whether the next
/// update is refused (as a full map would refuse it).
#[derive(Default)]
struct Maps {
    image: Option<MapImage>,
    updates: usize,
    refuse: bool,
}

struct MemoryKernel(Arc<Mutex<Maps>>);

impl Kernel for MemoryKernel {
    fn attach(&mut self, _: &str) -> Result<(), PlatformError> {
        Ok(())
    }
    fn detach_all(&mut self) {}
    fn attached(&self) -> Vec<UplinkView> {
        Vec::new()
    }
    fn apply(&mut self, image: &MapImage) -> Result<(), PlatformError> {
        let mut maps = self.0.lock().unwrap();
        if maps.refuse {
            return Err("the rule maps are full".into());
        }
        maps.image = Some(image.clone());
        maps.updates += 1;
        Ok(())
    }
    fn rule_counters(&self, _: u32) -> Counters {
        Counters::default()
    }
    fn counters(&self) -> ClassifierCounters {
        ClassifierCounters::default()
    }
    fn programs(&self) -> Vec<ProgramStatsView> {
        Vec::new()
    }
    fn set_fake_pools(&mut self, _: Ipv4Net, _: Ipv6Net) -> Result<(), PlatformError> {
        Ok(())
    }
    fn take_nat(&mut self) -> Option<Box<dyn NatTable>> {
        Some(Box::new(MemoryNat::default()))
    }
    fn take_pins(&mut self) -> Option<Box<dyn FlowPins>> {
        Some(Box::new(MemoryPins::default()))
    }
    fn take_encap(&mut self) -> Option<Box<dyn EncapTable>> {
        Some(Box::new(MemoryEncap::default()))
    }
    fn take_monitor_events(&mut self) -> Option<Box<dyn MonitorEvents>> {
        None
    }
    fn heartbeat(&self) -> Result<Box<dyn Heartbeat>, PlatformError> {
        Ok(Box::new(Fresh))
    }
    fn intercept_dns(&mut self, _: &InterceptSettings) -> Result<Box<dyn DnsInterception>, PlatformError> {
        Err("no DNS interception in these tests".into())
    }
}

struct Fresh;

impl Heartbeat for Fresh {
    fn beat(&mut self, _: Duration) -> Result<(), PlatformError> {
        Ok(())
    }
    fn beat_dns(&mut self, _: Duration) -> Result<(), PlatformError> {
        Ok(())
    }
    fn age(&self) -> Duration {
        Duration::ZERO
    }
    fn kernel_id(&self) -> Option<u32> {
        None
    }
}

struct Test {
    daemon: Arc<Daemon>,
    maps: Arc<Mutex<Maps>>,
    config: PathBuf,
    _dir: TempDir,
}

/// A directory removed when the test ends, however it ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("oasis-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn daemon(name: &str) -> Test {
    let dir = TempDir::new(name);
    let config_path = dir.0.join("oasis.yaml");
    let mut config = Config::default();
    config.dns.enabled = false;
    config.dns.state_file = dir.0.join("fakes.json");
    config.control_socket = dir.0.join("control.sock");
    let rules = config.rule_set(&config_path).unwrap();
    let maps = Arc::new(Mutex::new(Maps::default()));
    let mut kernel: Box<dyn Kernel> = Box::new(MemoryKernel(maps.clone()));
    let names = Arc::new(NameRules::compile(rules.names()).unwrap());
    let (link, _events) = MonitorLink::new(64);
    let dns = super::super::dns::start(
        &config,
        kernel.as_mut(),
        names.clone(),
        link.clone(),
        &Liveness::new(),
    )
    .await
    .unwrap();
    let tables = SharedTables::new(KernelTables {
        nat: kernel.take_nat().unwrap(),
        pins: kernel.take_pins().unwrap(),
        encap: kernel.take_encap().unwrap(),
    });
    let overlays = OverlayManager::load(Vec::new(), &LocalAddresses::default(), None);
    let routes = Routes::with_names(
        rules.rules(),
        rules.names(),
        names.clone(),
        overlays.table().clone(),
    );
    let engine = Engine::new(
        super::super::start::engine_settings(&config, 1500),
        routes,
        dns.fakes.clone(),
        Box::new(MonitorChooser::new(link.clone())),
        link,
        Instant::now(),
    );
    let daemon = Arc::new(Daemon::new(Parts {
        config_path: config_path.clone(),
        settings: Arc::new(config),
        rules,
        names,
        overlays,
        kernel,
        heartbeat: Box::new(Fresh),
        engine,
        tables,
        dns,
        monitor: Arc::default(),
        persister: super::super::persist::Persister::start(config_path.clone()).unwrap(),
        tun: TunView::default(),
        queue_reads: Arc::from([]),
        diverted: Box::new(|_| (0, 0)),
        own_addresses: Box::new(|_| {}),
        path_mtu: Box::new(|_| None),
        sockets: Arc::new(NoSockets),
    }));
    Test {
        daemon,
        maps,
        config: config_path,
        _dir: dir,
    }
}

impl Test {
    async fn ask(&self, request: Request) -> Response {
        let (progress, _) = watch::channel(None);
        self.daemon.clone().handle(request, Reporter(progress)).await
    }

    async fn add(&self, spec: RuleSpec) -> Response {
        self.ask(Request::AddRule {
            spec: Box::new(spec),
            dst_set: None,
        })
        .await
    }

    /// The action the classifier's maps give a TCP flow to `dport`.
    fn kernel_action(&self, dport: u16) -> Option<RuleAction> {
        let maps = self.maps.lock().unwrap();
        let key = FlowKey {
            family: FAMILY_V4,
            proto: 6,
            dst: {
                let mut dst = [0; 16];
                dst[..4].copy_from_slice(&[203, 0, 113, 9]);
                dst
            },
            dport,
            sport: 40000,
            ..FlowKey::default()
        };
        maps.image.as_ref()?.lookup(&key)
    }

    fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap_or_default()
    }

    async fn rule_ids(&self) -> Vec<u32> {
        match self.ask(Request::ListRules).await {
            Response::Rules { rules } => rules.iter().map(|r| r.id).collect(),
            other => panic!("listing rules: {other:?}"),
        }
    }
}

fn tcp_port(port: &str) -> RuleSpec {
    RuleSpec {
        proto: Some("tcp".into()),
        dport: Some(port.into()),
        via: "underlay".into(),
        ..RuleSpec::default()
    }
}

fn error_of(response: Response) -> String {
    match response {
        Response::Error { message } => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_reaches_the_kernel_and_the_config_file_and_leaves_both() {
    let test = daemon("add-del").await;
    assert_eq!(test.kernel_action(443), None);
    let id = match test.add(tcp_port("443")).await {
        Response::Rule { rule } => rule.id,
        other => panic!("adding a rule: {other:?}"),
    };
    assert!(
        test.kernel_action(443).is_some(),
        "the classifier claims the port"
    );
    assert_eq!(test.kernel_action(80), None, "and nothing else");
    let saved = test.config_text();
    assert!(
        saved.contains("dport: '443'") || saved.contains("dport: \"443\"") || saved.contains("dport: 443"),
        "{saved}"
    );
    assert_eq!(test.rule_ids().await, [id]);

    assert!(matches!(
        test.ask(Request::DelRule { id }).await,
        Response::Rule { .. }
    ));
    assert_eq!(test.kernel_action(443), None);
    assert!(!test.config_text().contains("443"), "{}", test.config_text());
    assert!(test.rule_ids().await.is_empty());
    let unknown = error_of(test.ask(Request::DelRule { id }).await);
    assert!(unknown.contains(&id.to_string()), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_kernel_refuses_changes_nothing() {
    let test = daemon("refused").await;
    let kept = match test.add(tcp_port("22")).await {
        Response::Rule { rule } => rule.id,
        other => panic!("adding a rule: {other:?}"),
    };
    let before = (test.config_text(), test.maps.lock().unwrap().image.clone());

    test.maps.lock().unwrap().refuse = true;
    let message = error_of(test.add(tcp_port("443")).await);
    assert!(
        message.contains("full") && message.contains("nothing changed"),
        "{message}"
    );
    assert_eq!(test.rule_ids().await, [kept]);
    assert_eq!(test.config_text(), before.0, "the config file is as it was");
    assert_eq!(
        test.maps.lock().unwrap().image,
        before.1,
        "the maps are as they were"
    );

    // Once the kernel takes it, the same rule goes in.
    test.maps.lock().unwrap().refuse = false;
    assert!(matches!(test.add(tcp_port("443")).await, Response::Rule { .. }));
    assert!(test.kernel_action(443).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_name_and_changes_nothing() {
    let test = daemon("bad-input").await;
    let updates = test.maps.lock().unwrap().updates;
    let message = error_of(test.add(tcp_port("99999")).await);
    assert!(message.contains("99999"), "{message}");
    let unknown = RuleSpec {
        via: "nowhere".into(),
        ..tcp_port("80")
    };
    let message = error_of(test.add(unknown).await);
    assert!(message.contains("nowhere"), "{message}");
    // An import is all or nothing: its bad rule is named by its place.
    let import = Request::ImportRules {
        specs: vec![tcp_port("80"), tcp_port("eighty"), tcp_port("81")],
    };
    let message = error_of(test.ask(import).await);
    assert!(
        message.contains("rule 2") && message.contains("eighty"),
        "{message}"
    );
    assert!(test.rule_ids().await.is_empty());
    assert_eq!(
        test.maps.lock().unwrap().updates,
        updates,
        "the kernel was not touched"
    );
    assert!(!Path::new(&test.config).exists() || !test.config_text().contains("dport"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_read_without_the_os() {
    let test = daemon("status").await;
    test.add(tcp_port("443")).await;
    let status = match test.ask(Request::Status).await {
        Response::Status { status } => status,
        other => panic!("status: {other:?}"),
    };
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["rules"].as_u64(), Some(1), "{json}");
}

/// A host with no sockets at all.
struct NoSockets;

impl crate::platform::SocketLookup for NoSockets {
    fn connected(&self, _: u8, _: std::net::SocketAddr, _: std::net::SocketAddr) -> bool {
        false
    }
    fn tcp_peers(
        &self,
        _: &dyn Fn(std::net::IpAddr) -> bool,
    ) -> std::io::Result<Vec<(std::net::SocketAddr, std::net::SocketAddr)>> {
        Ok(Vec::new())
    }
    fn end_socket(&self, _: u8, _: std::net::SocketAddr, _: std::net::SocketAddr) -> std::io::Result<()> {
        Err(std::io::ErrorKind::NotFound.into())
    }
}

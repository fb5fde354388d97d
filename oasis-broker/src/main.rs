//! `oasis`: the daemon (`oasis run`) and the command line that controls it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use oasis_broker::config::{Config, DEFAULT_CONFIG_PATH};
use oasis_broker::control::{self, Request, Response, SetUpload};
use oasis_broker::prefix_set::PrefixSet;
use oasis_broker::render;
use oasis_broker::rules::RuleSpec;

/// Oasis routes chosen parts of this host's traffic over overlay networks
/// (or explicitly over the plain Internet, the "underlay"), with no change to
/// applications. An eBPF classifier on the uplink picks the packets that
/// rules claim and hands them to the daemon; everything else never leaves
/// the kernel.
#[derive(Parser, Debug)]
#[command(name = "oasis", version, propagate_version = true, after_help = EXAMPLES)]
struct Cli {
    /// The configuration file (daemon settings and the rules).
    #[arg(long, global = true, env = "OASIS_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// The daemon's control socket [default: `control_socket` from the
    /// config file, else /run/oasis/oasis.sock].
    #[arg(long, global = true, env = "OASIS_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  oasis run                                              start the daemon (as root)
  oasis rule add --proto tcp --dport 8080 --via underlay
  oasis rule add --dst 203.0.113.0/24 --via underlay
  oasis rule list
  oasis rule del 2
  oasis overlay add detour https://osp.example/detour.xml
  oasis rule add --proto tcp --dport 80 --via detour
  oasis rule add --name '.*\\.edu$' --via detour         names, matched at DNS time
  oasis rule add --name-suffix example.org --via underlay
  oasis rule add --dst 203.0.113.0/24 --metric latency  the Monitor picks the carrier
  oasis monitor                                          what it measured and decided
  oasis flows                                            live flows, carriers and why
  oasis dns                                              the fake-address table
  oasis status --json
  oasis ui                                               the web page, and the API dashboards speak

Logs: set RUST_LOG (e.g. RUST_LOG=oasis_broker=debug) for the daemon.";

// Made once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground: create the TUN device, attach the
    /// classifier to the uplinks and serve the control socket. Stop it with
    /// Ctrl-C or SIGTERM; it detaches everything it attached.
    Run,
    /// Compiles an overlay code module read from standard input and writes
    /// its compiled code to standard output. The daemon runs this in a
    /// child process with limits on memory and time.
    #[command(hide = true, name = "compile-module")]
    CompileModule {
        #[arg(long, value_parser = ["overlay", "monitor"])]
        role: String,
    },
    /// Injects a fault into a daemon started with OASIS_FAULTS=1 (tests).
    #[command(hide = true)]
    Fault { name: String },
    /// Add, list and delete rules.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Join, list, show and leave overlays.
    #[command(subcommand)]
    Overlay(OverlayCommand),
    /// Show the fake-address table: each name a name rule claimed, the
    /// fake address applications were given, the real addresses behind
    /// it, and the carrier new flows to it take.
    Dns {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show what the Monitor measured and decided for metric rules: each
    /// carrier's health and probe traffic; round trip, loss and goodput
    /// per carrier and destination prefix; which carrier new flows of each
    /// metric rule take, why, and how the candidates compare.
    Monitor {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show the live flows the broker knows: each flow's rule, carrier,
    /// and for metric rules why the Monitor chose it. With --end, end
    /// flows instead: their sockets are closed (the application sees the
    /// connection aborted, a TCP peer a reset).
    Flows {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// End the flow with this id, or a unique start of it (the ID
        /// column, 8 characters); repeat for more.
        #[arg(long, value_name = "ID")]
        end: Vec<String>,
        /// End every live flow.
        #[arg(long, conflicts_with = "end")]
        end_all: bool,
    },
    /// Where the web page and the REST API are (Clash dashboards such as
    /// metacubexd, yacd and zashboard speak it), and a link that fills in
    /// the API's secret. docs/api.md tells more.
    Ui {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `oasis completions bash >
    /// /etc/bash_completion.d/oasis` (`cargo xtask install` does this).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Show what the daemon is doing: uplinks, TUN, heartbeat, counters.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RuleCommand {
    /// Add a rule: traffic matching every given field goes via the carrier.
    /// Rules are tried in the order they were added; the first match wins.
    /// The rule takes effect at once and is saved in the config file.
    ///
    /// A name rule (--name, --name-exact, --name-suffix, --name-keyword)
    /// claims DNS names instead of packets: applications asking for a
    /// claimed name get a fake address, and their flows to it take the
    /// rule's carrier. Among name rules too the first added wins. Header
    /// rules never see fake addresses, so the two kinds do not compete.
    ///
    /// A metric rule (--metric instead of --via) lets the Monitor pick
    /// each new flow's carrier by measurement. The underlay is the
    /// incumbent: an overlay takes flows only when it is clearly better,
    /// and a flow keeps its carrier for life.
    #[command(after_help = "\
Examples:
  oasis rule add --proto tcp --dport 8080 --via underlay
  oasis rule add --proto udp --dport 27000-27100 --via underlay
  oasis rule add --dst 203.0.113.0/24 --via underlay
  oasis rule add --dst 2001:db8::/32 --proto icmp --via underlay
  oasis rule add --dst-set country-nl.txt --proto tcp --dport 443 --via exit
  oasis rule add --app firefox --via detour           (by application)
  oasis rule add --cgroup system.slice/backup.service --via underlay
  oasis rule add --uid alice --proto tcp --dport 443 --via exit
  oasis rule add --name '.*\\.edu$' --via detour      (regex, the paper's syntax)
  oasis rule add --name-suffix example.org --via detour   (example.org and below)
  oasis rule add --name-exact www.example.com --via underlay
  oasis rule add --name-keyword video --via detour
  oasis rule add --name-suffix example.edu --metric latency   (the Monitor chooses)
  oasis rule add --proto udp --dport 3478 --metric 'loss<1%'
  oasis rule add --dst 203.0.113.0/24 --dport 443 --metric throughput
  oasis rule add --proto tcp --dport 22 --metric latency --among detour,campus")]
    Add(Box<RuleAddArgs>),
    /// Add many rules from a file in one step: one pattern per line,
    /// blank lines and lines starting with '#' skipped. All are added, or
    /// none when any line is bad.
    ///
    /// Names (suffix, exact, keyword, regex) make a name rule each;
    /// prefixes (cidr) make one rule claiming traffic to any of them, the
    /// same as `rule add --dst-set FILE`.
    ///
    /// With --url, the list is one rule that keeps itself current: the
    /// daemon downloads it now (nothing changes if that fails or a line is
    /// bad), keeps the copy beside its config file, and downloads it again
    /// every --every (asking the server whether it changed). A refresh
    /// that fails leaves the last good copy in effect; `oasis rule list`
    /// shows each list's age and last error. Formats: docs/rules.md.
    #[command(after_help = "\
Examples:
  oasis rule import --kind suffix --via detour domains.txt
  oasis rule import --kind regex --via underlay patterns.txt
  oasis rule import --kind cidr --via exit country-nl.txt
  oasis rule import --url https://lists.example/ads.txt --kind suffix --via underlay
  oasis rule import --url https://lists.example/nl.cidr --kind cidr --via exit --every 12h")]
    Import {
        /// What each line is: a name suffix, exact name, keyword or regex,
        /// or a destination prefix (cidr).
        #[arg(long, value_enum)]
        kind: ImportKind,
        /// Where flows to matching names go.
        #[arg(long, value_name = "CARRIER", required_unless_present = "metric")]
        via: Option<String>,
        /// Let the Monitor choose, for this metric (see `rule add --help`).
        #[arg(long, value_name = "METRIC", conflicts_with = "via")]
        metric: Option<String>,
        /// With --metric: the overlays to choose from besides the underlay.
        #[arg(long, value_name = "OVERLAYS", requires = "metric")]
        among: Option<String>,
        /// Fetch the list from this http(s) URL, and again every --every.
        #[arg(long, value_name = "URL", conflicts_with = "file")]
        url: Option<String>,
        /// With --url: how often to fetch it again (30m, 24h, 7d).
        #[arg(long, value_name = "INTERVAL", requires = "url", default_value = "24h")]
        every: String,
        /// With --url: accept only a download with this SHA-256.
        #[arg(long, value_name = "HEX", requires = "url")]
        sha256: Option<String>,
        /// The file ('-' for standard input).
        #[arg(required_unless_present = "url")]
        file: Option<PathBuf>,
    },
    /// List the rules with the traffic each has matched.
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Fetch list rules' lists now instead of at their interval: one rule's
    /// by id, or every list's. A list that did not change costs nothing;
    /// one that fails to download or read leaves its last good copy in
    /// effect, and the error shows here and in `oasis rule list`.
    Refresh {
        /// The list rule's id; every list rule's when left out.
        id: Option<u32>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Pin a metric rule's new flows to one carrier while it is up (the
    /// underlay when it is not), overriding the Monitor; --clear gives
    /// them back to it. Flows already running keep their carrier. A pin
    /// lasts until cleared or the daemon restarts.
    #[command(after_help = "\
Examples:
  oasis rule pin 4 detour
  oasis rule pin 4 underlay
  oasis rule pin 4 --clear")]
    Pin {
        /// The metric rule's id.
        id: u32,
        /// An overlay the rule may choose, or `underlay`.
        #[arg(required_unless_present = "clear")]
        carrier: Option<String>,
        /// Give the rule back to the Monitor.
        #[arg(long, conflicts_with = "carrier")]
        clear: bool,
    },
    /// Delete a rule by id. Flows it already carries keep their path until
    /// they end; new flows no longer match it.
    Del {
        /// The rule's id, as `oasis rule list` shows it.
        id: u32,
    },
}

#[derive(Subcommand, Debug)]
enum OverlayCommand {
    /// Join an overlay: the daemon fetches its XML specification from URL
    /// (http or https), checks it and stores it in the config file. Rules
    /// then name the overlay with `--via NAME`.
    ///
    /// A specification may carry a code module (`<module kind="overlay">`):
    /// the daemon downloads it, checks its SHA-256, compiles it and runs it
    /// in a sandbox (docs/modules.md); the overlay's flows then go through
    /// it. While a module restarts, new flows take the underlay unless the
    /// overlay was joined with --pin.
    ///
    /// A monitor module (`<module kind="monitor">`) runs the same way but
    /// carries nothing itself: metric rules that name it (`rule add ...
    /// --metric TEXT --monitor NAME`) let it pick the joined overlay each of
    /// their flows takes.
    ///
    /// A WireGuard peer you already use joins from its wg-quick file
    /// (`--wireguard FILE`, no URL): Oasis runs the tunnel itself, with no
    /// interface and none of the file's PostUp commands. Its rules' flows
    /// leave from the file's `Address=`, sealed for the peer whose
    /// `AllowedIPs` hold their destination. The file is kept in the key
    /// store beside the config (mode 0600); its private key is never shown.
    ///
    /// A specification whose entry nodes speak WireGuard
    /// (`<wireguard public-key=...>`) joins by URL as any other: the daemon
    /// makes this host a key pair and prints the public key, for the
    /// operator to register.
    #[command(after_help = "\
Examples:
  oasis overlay add detour https://osp.example/detour.xml
  oasis overlay add home --wireguard /etc/wireguard/home.conf
  oasis overlay add campus http://10.1.2.3/campus.xml --token 00112233445566778899aabbccddeeff
  oasis overlay add test http://10.1.2.3/test.xml --module-file target/my_module.wasm
  oasis rule add --proto tcp --dport 80 --via detour
  oasis overlay add fastest https://osp.example/fastest.xml     # a monitor module
  oasis rule add --proto tcp --dport 443 --metric latency --monitor fastest")]
    Add {
        /// The local name for the overlay (letters, digits, - and _).
        name: String,
        /// Where the overlay's specification is published.
        #[arg(required_unless_present = "wireguard")]
        url: Option<String>,
        /// Join a WireGuard peer from its wg-quick file instead of a
        /// specification.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["url", "token", "module_file"])]
        wireguard: Option<PathBuf>,
        /// For overlays whose exit nodes check a token: the shim's bytes,
        /// as many as the specification's shim length, in hex.
        #[arg(long, value_name = "HEX")]
        token: Option<String>,
        /// For module authors: run this WebAssembly file as the overlay's
        /// code module instead of the one the specification names (in the
        /// same role: overlay or monitor).
        #[arg(long, value_name = "PATH")]
        module_file: Option<PathBuf>,
        /// Never let the overlay's flows take the underlay: not while its
        /// code module restarts (they wait), nor while its WireGuard peer
        /// does not answer (they are refused at once).
        #[arg(long)]
        pin: bool,
        /// Print the joined overlay as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the joined overlays with their traffic.
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show one overlay: entry nodes, shim, module, rules, traffic.
    Show {
        name: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Leave an overlay. Refused while rules use it: delete those first.
    Del { name: String },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ImportKind {
    /// A name and every name below it.
    Suffix,
    Exact,
    Keyword,
    Regex,
    /// Destination prefixes: all of them one rule (a prefix set).
    Cidr,
}

impl ImportKind {
    fn name(self) -> &'static str {
        match self {
            ImportKind::Suffix => "suffix",
            ImportKind::Exact => "exact",
            ImportKind::Keyword => "keyword",
            ImportKind::Regex => "regex",
            ImportKind::Cidr => "cidr",
        }
    }

    /// A name rule for `pattern` with the carrier of `template`.
    fn spec(self, pattern: String, template: &RuleSpec) -> anyhow::Result<RuleSpec> {
        let mut spec = template.clone();
        match self {
            ImportKind::Suffix => spec.name_suffix = Some(pattern),
            ImportKind::Exact => spec.name_exact = Some(pattern),
            ImportKind::Keyword => spec.name_keyword = Some(pattern),
            ImportKind::Regex => spec.name = Some(pattern),
            ImportKind::Cidr => bail!("prefixes make one rule, not one each"),
        }
        Ok(spec)
    }
}

/// Reads a prefix-set file ('-': standard input) and checks it here, so a
/// bad line is reported with its number before anything is sent.
fn read_set(file: &std::path::Path) -> anyhow::Result<(SetUpload, Arc<PrefixSet>)> {
    let (name, text) = if file.as_os_str() == "-" {
        let text = std::io::read_to_string(std::io::stdin()).context("reading standard input")?;
        ("prefixes.txt".to_string(), text)
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "prefixes.txt".into());
        (name, text)
    };
    let set = PrefixSet::parse(&file.display().to_string(), &text)?;
    Ok((SetUpload { name, text }, Arc::new(set)))
}

/// `rule import --kind cidr`: one rule holding the file's prefixes.
fn import_set(socket: &std::path::Path, template: RuleSpec, file: &std::path::Path) -> anyhow::Result<()> {
    let (upload, set) = read_set(file)?;
    let spec = RuleSpec {
        dst_set: Some(upload.name.clone()),
        ..template
    };
    spec.parse_with(Some(set.clone()))?;
    eprintln!(
        "adding one rule for {} prefixes ({} IPv4 and {} IPv6 after merging) ...",
        set.listed(),
        set.v4().len(),
        set.v6().len()
    );
    let request = Request::AddRule {
        spec: Box::new(spec),
        dst_set: Some(upload),
    };
    match call(socket, &request)? {
        Response::Rule { rule } => println!("added rule {}: {} via {}", rule.id, rule.subset, rule.via),
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

#[derive(Args, Debug)]
struct RuleAddArgs {
    /// DNS names matching this regular expression (case-insensitive;
    /// anchor with ^ and $).
    #[arg(long, value_name = "REGEX", help_heading = "Name rules")]
    name: Option<String>,
    /// Exactly this DNS name.
    #[arg(long, value_name = "NAME", help_heading = "Name rules")]
    name_exact: Option<String>,
    /// This name and every name below it (`example.org` claims
    /// `www.example.org`, not `badexample.org`).
    #[arg(long, value_name = "NAME", help_heading = "Name rules")]
    name_suffix: Option<String>,
    /// Names containing this text.
    #[arg(long, value_name = "TEXT", help_heading = "Name rules")]
    name_keyword: Option<String>,
    /// Protocol: tcp, udp, icmp (ICMP or ICMPv6) or a protocol number.
    #[arg(long, value_name = "PROTO")]
    proto: Option<String>,
    /// Destination address or prefix, IPv4 or IPv6 (203.0.113.0/24).
    #[arg(long, value_name = "PREFIX")]
    dst: Option<String>,
    /// Any destination in a file of prefixes, one per line, IPv4 and IPv6
    /// ('#' starts a comment): a country or ASN list of up to 262,143
    /// prefixes per family. The daemon keeps a copy beside its config file.
    #[arg(long, value_name = "FILE", conflicts_with = "dst")]
    dst_set: Option<PathBuf>,
    /// Destination port or inclusive range (443, 8000-8099).
    #[arg(long, value_name = "PORTS")]
    dport: Option<String>,
    /// Source port or inclusive range.
    #[arg(long, value_name = "PORTS")]
    sport: Option<String>,
    /// Sent by this user's sockets (a name or a uid). Only this host's
    /// own traffic has a sender; forwarded traffic never matches.
    #[arg(long, value_name = "USER", help_heading = "Who sent it")]
    uid: Option<String>,
    /// Sent from this cgroup v2 or any cgroup below it: a systemd unit,
    /// slice or scope (system.slice/backup.service,
    /// user.slice/user-1000.slice), below the cgroup v2 mount.
    #[arg(long, value_name = "PATH", help_heading = "Who sent it")]
    cgroup: Option<String>,
    /// Sent by sockets a process of this name connected (or sent on
    /// first): the executable's file name as `ps -o comm` shows it, at
    /// most 15 bytes (a path is taken for its file name).
    #[arg(long, value_name = "NAME", help_heading = "Who sent it")]
    app: Option<String>,
    /// Where matching traffic goes: `underlay` (the plain Internet, through
    /// the broker) or the name of a joined overlay.
    #[arg(long, value_name = "CARRIER", required_unless_present = "metric")]
    via: Option<String>,
    /// Let the Monitor choose each new flow's carrier, among the underlay
    /// and the joined overlays, for this metric: `latency` (lowest round
    /// trip), `loss<X%` (stay on the underlay until its loss reaches X%),
    /// or `throughput` (highest goodput). The underlay stays unless an
    /// overlay is clearly better; see `oasis monitor`.
    #[arg(
        long,
        value_name = "METRIC",
        conflicts_with = "via",
        help_heading = "Metric rules"
    )]
    metric: Option<String>,
    /// The overlays the Monitor may choose from (comma-separated), besides
    /// the underlay, which is always a candidate [default: every joined
    /// overlay].
    #[arg(
        long,
        value_name = "OVERLAYS",
        requires = "metric",
        conflicts_with = "monitor",
        help_heading = "Metric rules"
    )]
    among: Option<String>,
    /// A monitor module decides instead of the built-in Monitor: a joined
    /// overlay whose specification declares one (it runs in the sandbox,
    /// see docs/modules.md). It receives the metric text with each packet
    /// and chooses among every joined overlay (so no --among).
    #[arg(
        long,
        value_name = "OVERLAY",
        requires = "metric",
        help_heading = "Metric rules"
    )]
    monitor: Option<String>,
    /// Print the new rule as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CompileModule { role } = &cli.command {
        let role = match role.as_str() {
            "monitor" => oasis_broker::module::Role::Monitor,
            _ => oasis_broker::module::Role::Overlay,
        };
        return oasis_broker::module::compiler::child_main(role);
    }
    // A command whose output is cut short (`oasis dns | head`) ends quietly,
    // as Unix tools do, instead of panicking on the closed pipe. The daemon
    // keeps ignoring SIGPIPE: a CLI that went away must not kill it.
    #[cfg(unix)]
    if !matches!(cli.command, Command::Run) {
        // SAFETY: setting a signal's disposition to its default, before
        // any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oasis: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause whose text the message
/// already contains (our error types print their cause themselves).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = control_socket(&cli);
    match cli.command {
        Command::Run => run_daemon(&cli.config),
        Command::CompileModule { .. } => unreachable!("handled before"),
        Command::Rule(command) => rule(&socket, command),
        Command::Overlay(command) => overlay(&socket, command),
        Command::Monitor { json } => match call(&socket, &Request::Monitor)? {
            Response::Monitor { monitor } => show(json, &*monitor, render::monitor),
            other => bail!("unexpected reply: {other:?}"),
        },
        Command::Fault { name } => match call(&socket, &Request::Fault { name })? {
            Response::Done { message } => {
                println!("{message}");
                Ok(())
            }
            other => bail!("unexpected reply: {other:?}"),
        },
        Command::Flows { end, end_all, .. } if end_all || !end.is_empty() => {
            let ids = (!end_all).then_some(end);
            match call(&socket, &Request::EndFlows { ids })? {
                Response::Done { message } => {
                    println!("{message}");
                    Ok(())
                }
                other => bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Flows { json, .. } => match call(&socket, &Request::Flows { max_age_ms: None })? {
            Response::Flows { flows } => show(json, &flows, |f| render::flows(f)),
            other => bail!("unexpected reply: {other:?}"),
        },
        Command::Ui { json } => match call(&socket, &Request::Api)? {
            Response::Api { url, secret } => {
                if json {
                    println!("{}", serde_json::json!({ "url": url, "secret": secret }));
                    return Ok(());
                }
                match (url, secret) {
                    (None, _) => println!(
                        "the API is off (api.enabled in the config file, or it could not listen: the daemon's log says why)"
                    ),
                    (Some(url), Some(secret)) => {
                        println!("web page:   {url}#secret={secret}");
                        println!("API:        {}", url.trim_end_matches("ui/"));
                        println!("secret:     {secret}  (dashboards ask for it)");
                    }
                    (Some(url), None) => {
                        println!("web page:   {url}");
                        println!("API:        {} (no secret)", url.trim_end_matches("ui/"));
                    }
                }
                Ok(())
            }
            other => bail!("unexpected reply: {other:?}"),
        },
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "oasis", &mut std::io::stdout());
            Ok(())
        }
        Command::Dns { json } => match call(&socket, &Request::Dns)? {
            Response::Dns { dns } => show(json, &*dns, render::dns_table),
            other => bail!("unexpected reply: {other:?}"),
        },
        Command::Status { json } => match call(&socket, &Request::Status)? {
            Response::Status { status } => show(json, &*status, render::status),
            other => bail!("unexpected reply: {other:?}"),
        },
    }
}

/// Prints what the daemon answered: JSON for scripts, else as `render`
/// lays it out for people.
fn show<T: serde::Serialize>(json: bool, value: &T, render: impl Fn(&T) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}

fn rule(socket: &std::path::Path, command: RuleCommand) -> anyhow::Result<()> {
    match command {
        RuleCommand::Add(args) => add_rule(socket, *args),
        RuleCommand::Import {
            kind,
            via,
            metric,
            among,
            url,
            every,
            sha256,
            file,
        } => {
            let template = RuleSpec {
                via: via.unwrap_or_default(),
                metric,
                among,
                ..RuleSpec::default()
            };
            let Some(file) = file else {
                let spec = RuleSpec {
                    list: url,
                    list_kind: Some(kind.name().into()),
                    every: Some(every),
                    sha256,
                    ..template
                };
                // A typo in the URL, interval or digest is told here.
                spec.list_source()?;
                return add_spec(socket, spec, None, false);
            };
            if kind == ImportKind::Cidr {
                return import_set(socket, template, &file);
            }
            import_patterns(socket, kind, &template, &file)
        }
        RuleCommand::List { json } => match call(socket, &Request::ListRules)? {
            Response::Rules { rules } => show(json, &rules, |r| render::rule_table(r)),
            other => bail!("unexpected reply: {other:?}"),
        },
        RuleCommand::Refresh { id, json } => match call(socket, &Request::RefreshLists { id })? {
            Response::Rules { rules } if rules.is_empty() => {
                println!(
                    "no list rules; add one with `oasis rule import --url URL --kind KIND --via CARRIER`"
                );
                Ok(())
            }
            Response::Rules { rules } => show(json, &rules, |r| render::rule_table(r)),
            other => bail!("unexpected reply: {other:?}"),
        },
        RuleCommand::Pin { id, carrier, .. } => match call(socket, &Request::Pin { rule: id, carrier })? {
            Response::Done { message } => {
                println!("{message}");
                Ok(())
            }
            other => bail!("unexpected reply: {other:?}"),
        },
        RuleCommand::Del { id } => match call(socket, &Request::DelRule { id })? {
            Response::Rule { rule } => {
                println!("deleted rule {}: {} via {}", rule.id, rule.subset, rule.via);
                Ok(())
            }
            other => bail!("unexpected reply: {other:?}"),
        },
    }
}

fn add_rule(socket: &std::path::Path, args: RuleAddArgs) -> anyhow::Result<()> {
    let upload = args.dst_set.as_deref().map(read_set).transpose()?;
    let spec = RuleSpec {
        proto: args.proto,
        dst: args.dst,
        dst_set: upload.as_ref().map(|(upload, _)| upload.name.clone()),
        dport: args.dport,
        sport: args.sport,
        uid: args.uid,
        cgroup: args.cgroup,
        app: args.app,
        name: args.name,
        name_exact: args.name_exact,
        name_suffix: args.name_suffix,
        name_keyword: args.name_keyword,
        via: args.via.unwrap_or_default(),
        metric: args.metric,
        among: args.among,
        monitor: args.monitor,
        ..RuleSpec::default()
    };
    // Check locally first so a typo is reported even with no daemon.
    let (upload, set) = upload.unzip();
    let (subset, _) = spec.parse_with(set)?;
    let sender = match &subset {
        oasis_broker::rules::Subset::Header(header) => &header.sender,
        oasis_broker::rules::Subset::Name(_, sender) => sender,
    };
    if let Some(app) = &sender.app {
        let kept = oasis_broker::sender::app_text(&app.key());
        if !app.as_str().ends_with(&kept) {
            eprintln!(
                "note: the kernel keeps 15 bytes of a process name: the rule matches processes named {kept:?}"
            );
        }
    }
    if let Some(cgroup) = &sender.cgroup
        && oasis_broker::sender::host_cgroup_id(cgroup).is_none()
    {
        eprintln!(
            "note: no cgroup {cgroup} exists now; the rule claims nothing until one does (the daemon checks every second)"
        );
    }
    add_spec(socket, spec, upload, args.json)
}

fn add_spec(
    socket: &std::path::Path,
    spec: RuleSpec,
    dst_set: Option<SetUpload>,
    json: bool,
) -> anyhow::Result<()> {
    let request = Request::AddRule {
        spec: Box::new(spec),
        dst_set,
    };
    match call(socket, &request)? {
        Response::Rule { rule } if json => println!("{}", serde_json::to_string_pretty(&rule)?),
        Response::Rule { rule } => println!("added rule {}: {} via {}", rule.id, rule.subset, rule.via),
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

/// `rule import` of names, one pattern a line: all or none.
fn import_patterns(
    socket: &std::path::Path,
    kind: ImportKind,
    template: &RuleSpec,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut specs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let spec = kind.spec(line.to_string(), template)?;
        spec.parse()
            .with_context(|| format!("{} line {}", file.display(), number + 1))?;
        specs.push(spec);
    }
    if specs.is_empty() {
        bail!("{} holds no patterns", file.display());
    }
    eprintln!("importing {} rules ...", specs.len());
    match call(socket, &Request::ImportRules { specs })? {
        Response::Imported { count, first, last } => match (first, last) {
            (Some(first), Some(last)) => println!("imported {count} rules, ids {first} to {last}"),
            _ => println!("imported no rules"),
        },
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

fn overlay(socket: &std::path::Path, command: OverlayCommand) -> anyhow::Result<()> {
    match command {
        OverlayCommand::Add {
            name,
            url,
            wireguard,
            token,
            module_file,
            pin,
            json,
        } => {
            let module_file = module_file.as_deref().map(module_upload).transpose()?;
            let wireguard = wireguard.as_deref().map(wireguard_upload).transpose()?;
            let request = Request::OverlayAdd {
                name,
                url: url.unwrap_or_default(),
                token,
                module_file,
                pinned: pin,
                wireguard,
            };
            match call(socket, &request)? {
                Response::Overlay { overlay } if json => {
                    println!("{}", serde_json::to_string_pretty(&overlay)?)
                }
                Response::Overlay { overlay } => {
                    println!("joined overlay {}", overlay.name);
                    print!("{}", render::overlay(&overlay));
                    // A key pair made for a specification's WireGuard
                    // transport: the operator must learn its public half.
                    if let Some(wg) = &overlay.wireguard
                        && !overlay.url.starts_with("wireguard:")
                    {
                        println!(
                            "\nThis host's WireGuard key pair was made for this overlay: give its operator \
                             the public key\n    {}\nThe overlay carries flows once the operator has added it.",
                            wg.public_key
                        );
                    }
                }
                other => bail!("unexpected reply: {other:?}"),
            }
            Ok(())
        }
        OverlayCommand::List { json } => match call(socket, &Request::OverlayList)? {
            Response::Overlays { overlays } => show(json, &overlays, |o| render::overlay_table(o)),
            other => bail!("unexpected reply: {other:?}"),
        },
        OverlayCommand::Show { name, json } => match call(socket, &Request::OverlayShow { name })? {
            Response::Overlay { overlay } => show(json, &*overlay, render::overlay),
            other => bail!("unexpected reply: {other:?}"),
        },
        OverlayCommand::Del { name } => {
            match call(socket, &Request::OverlayDel { name })? {
                Response::Overlay { overlay } if overlay.live_flows > 0 => println!(
                    "left overlay {}; its {} live flows end: each gets a TCP reset or an ICMP unreachable on its next packet",
                    overlay.name, overlay.live_flows
                ),
                Response::Overlay { overlay } => println!("left overlay {}", overlay.name),
                other => bail!("unexpected reply: {other:?}"),
            }
            Ok(())
        }
    }
}

/// A module author's build, sent whole (the daemon may not see the file).
/// Reads a wg-quick file for the daemon, warning as wg-quick does when
/// others may read it (it holds a private key).
fn wireguard_upload(path: &std::path::Path) -> anyhow::Result<control::WireGuardUpload> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > oasis_wireguard::conf::MAX_CONF_BYTES as u64 {
        bail!("{} is {} bytes: not a wg-quick file", path.display(), meta.len());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: {} may be read by others than its owner (it holds a private key): chmod 600 it",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(control::WireGuardUpload {
        name: path.display().to_string(),
        text,
    })
}

fn module_upload(path: &std::path::Path) -> anyhow::Result<control::ModuleUpload> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    eprintln!(
        "sending {} ({} bytes, sha256 {}) ...",
        path.display(),
        bytes.len(),
        oasis_broker::module::digest(&bytes)
    );
    Ok(control::ModuleUpload {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        hex: hex::encode(bytes),
    })
}

fn control_socket(cli: &Cli) -> PathBuf {
    match &cli.socket {
        Some(socket) => socket.clone(),
        None => Config::load_or_default(&cli.config)
            .map(|c| c.control_socket)
            .unwrap_or_else(|_| Config::default().control_socket),
    }
}

/// Sends a request to the daemon and waits for its answer, showing on
/// standard error what a long request is doing; a refusal becomes this
/// command's error.
fn call(socket: &std::path::Path, request: &Request) -> anyhow::Result<Response> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut last = String::new();
    let result = control::call(socket, request, |progress| {
        let text = progress.to_string();
        if text == last {
            return;
        }
        if tty {
            eprint!("\r\x1b[K{text} ...");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{text} ...");
        }
        shown = true;
        last = text;
    });
    if shown && tty {
        eprint!("\r\x1b[K");
    }
    match result? {
        Response::Error { message } => bail!("{message}"),
        response => Ok(response),
    }
}

#[cfg(target_os = "linux")]
fn run_daemon(config: &std::path::Path) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // boringtun reports every retried or given-up handshake as a warning
    // or an error, every five seconds while a peer is away; the daemon
    // says once when a peer goes down or comes back, and `overlay show`
    // says why. RUST_LOG=boringtun=debug shows the protocol's own lines.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("boringtun")) {
        filter = filter.add_directive("boringtun=off".parse().expect("a valid directive"));
    }
    {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        // Under systemd (JOURNAL_STREAM set) each event goes to the
        // journal with its level and fields (`journalctl -u oasis -p
        // warning`); elsewhere, or if the journal cannot be reached, to
        // stderr.
        let journal = std::env::var_os("JOURNAL_STREAM")
            .is_some()
            .then(|| tracing_journald::layer().ok())
            .flatten();
        let output = match journal {
            Some(journal) => journal.boxed(),
            None => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(output)
            .with(oasis_broker::api::LogFeed::global().layer())
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(oasis_broker::daemon::run(
        config,
        oasis_broker::platform::linux::LinuxPlatform,
    ));
    // Whatever blocking work is still running (a module compiling, a
    // specification being fetched) must not keep a stopped daemon alive:
    // the classifier is detached already, and the process exits now.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn run_daemon(_config: &std::path::Path) -> anyhow::Result<()> {
    bail!("the Oasis daemon runs on Linux only for now")
}

//! `meshctl`: the admin CLI of meshlink. It talks to the coordinator's HTTP admin API and
//! shows the answers as aligned tables (`-o table`, the default) or as the server's JSON,
//! pretty-printed (`-o json`).
//!
//! # Usage
//!
//! ```text
//! meshctl [--coordinator URL[,URL...]] [--admin-token-file FILE | --admin-token TOKEN] [-o table|json] COMMAND
//!
//! meshctl network create NAME --cidr CIDR
//! meshctl network list
//! meshctl token create --network NAME [--tag TAG]... [--expires 1h|30m|2d|90s|never] [--uses N|unlimited]
//! meshctl token list
//! meshctl token revoke ID
//! meshctl node list [--network NAME]
//! meshctl node show NODE [--network NAME]      # NODE is an id or a name
//! meshctl node revoke NODE [--network NAME]
//! meshctl node rotate-key NODE [--network NAME] [--public-key KEY | --new-key [--endpoint HOST:PORT] [--out FILE] [--qr]]
//! meshctl node add-external NAME --network NAME --via NODE [--public-key KEY] [--tag TAG]... [--endpoint HOST:PORT] [--out FILE] [--qr]
//! meshctl node external-config NODE [--network NAME] [--endpoint HOST:PORT] [--out FILE] [--qr]
//! meshctl node delete NODE [--network NAME]
//! meshctl workload create NAME --network NAME [--address IP] [--standby NODE,...] [--allow NODE,...] [--tag TAG]...
//! meshctl workload list [--network NAME]
//! meshctl workload show NAME [--network NAME]
//! meshctl workload attach NAME --node NODE [--network NAME]
//! meshctl workload move NAME --to NODE [--network NAME]
//! meshctl workload detach NAME [--network NAME]
//! meshctl workload delete NAME [--network NAME]
//! meshctl workload claim NAME [--interface mesh0] [--uapi-dir /var/run/wireguard] [--timeout 15s]
//! meshctl workload tag NAME +TAG|-TAG... [--network NAME]
//! meshctl node tag NODE +TAG|-TAG... [--network NAME]
//! meshctl policy set NETWORK FILE               # FILE `-`: standard input
//! meshctl policy get NETWORK
//! meshctl policy history NETWORK
//! meshctl policy rollback NETWORK VERSION
//! meshctl policy clear NETWORK
//! meshctl policy test --from NODE|WORKLOAD --to NODE|WORKLOAD --port tcp:PORT|udp:PORT|icmp [--network NAME]
//! meshctl admin-token create --name NAME --role read|operator|admin [--network NAME]
//! meshctl admin-token list
//! meshctl admin-token revoke ID
//! meshctl audit [--since 1h|UNIXTIME] [--node NODE] [--limit N]
//! meshctl relay list
//! meshctl status
//! ```
//!
//! The coordinator is `http://127.0.0.1:7444` unless `--coordinator` or
//! `MESHLINK_COORDINATOR` says otherwise. A mesh with several coordinators may be given all of
//! them, comma-separated (`--coordinator http://10.0.0.1:7444,http://10.0.0.2:7444`) or with
//! the flag repeated: a request goes to the first, and to the next only when the first does
//! not answer at all (an error answer such as 404 is the answer). A change (create, move,
//! revoke, delete...) is sent to the next one only when it surely never reached the one
//! before; when it may have, `meshctl` says so and that its outcome is unknown, rather than
//! risk making it twice. The admin token comes from `--admin-token-file`
//! (`MESHLINK_ADMIN_TOKEN_FILE`), which must be `chmod 600`, or from `--admin-token`
//! (`MESHLINK_ADMIN_TOKEN`); prefer the file, since a token on the command line is visible to
//! every local user in the process list.
//!
//! A join token made without `--uses` or `--expires` lets one node join within one hour; ask
//! for more in so many words: `--uses 10`, `--uses unlimited`, `--expires 30d`, `--expires never`.
//! `token create` prints the join token's text alone on the last line in table mode, and as the
//! `token` field in JSON mode, so both of these work:
//!
//! ```text
//! meshctl token create --network prod --tag web --expires 1h --uses 1
//! TOKEN=$(meshctl token create --network prod --uses 1 -o json | jq -r .token)
//! ```
//!
//! A workload is an overlay address that belongs to the workload, not to a VM: `attach` and
//! `move` (the same operation) give it to a node, `detach` takes it away, and each change takes
//! a new generation. They print one line, for example
//! `chat moved to vm-c (generation 3) in 12.4 ms (destination ready in 3.1 ms)`. `--network` may
//! be left out when the workload's name is used in one network only.
//!
//! `workload claim` is the exception to all of the above: run on a VM, it asks the *local*
//! agent, over its socket `<uapi-dir>/<interface>.sock`, to claim the workload for that VM's
//! node (which the workload must list in `--allow`). It needs no admin token and
//! does not talk to the coordinator itself; it prints `claimed chat (generation 4) in 9.8 ms`.
//!
//! An *external node* is a device that runs stock WireGuard and no agent (a phone, a router, an
//! appliance): `node add-external` registers it, reached through one node with an agent, its
//! gateway (`--via`), and prints its wg-quick configuration: one peer, the gateway, for the
//! network's whole prefix. Give the device's own public key with `--public-key` where it can
//! make its key pair (its private key then never leaves it; the file has a `PrivateKey` line to
//! fill in); without it `meshctl` makes the pair on this machine from the operating system's
//! random source and puts the private key in the configuration, and nowhere else (the
//! coordinator gets the public key only). `--out FILE` writes the configuration to a new file of
//! mode 0600 (never over an existing one) and prints one line; `--qr` shows it as a QR code for
//! a phone's WireGuard app instead of its text (with `--out`, besides the file). In JSON mode
//! these commands print `{"external_node": ANSWER, "wg_quick": TEXT}`, or `"file": PATH` in place
//! of `wg_quick` with `--out`. `node external-config` prints the configuration again (the
//! private key is not kept, so with the line to fill in); `node rotate-key` of an external node
//! needs its new key: `--public-key`, or `--new-key` for a pair made here and a new
//! configuration.
//!
//! `token revoke`, `node delete` and `workload delete` print a confirmation in table mode and
//! nothing in JSON mode. On failure, `meshctl` prints one line to stderr and exits with status 1; usage errors
//! exit with status 2.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use clap::builder::NonEmptyStringValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use meshctl::admin_token::AdminToken;
use meshctl::client::{AdminClient, CoordinatorUrl, CoordinatorUrls, Reply, DEFAULT_COORDINATOR};
use meshctl::external::{DeviceConfig, DeviceKey, Endpoint, PrivateFile};
use meshctl::render::{Change, DeviceChange};
use meshctl::{claim, duration, render};
use meshlink_api::{
    AuditFilter, CreateAdminToken, CreateExternalNode, CreateNetwork, CreateToken, CreateWorkload,
    ExternalNode, NetworkName, NodeName, PublicKey, Role, SetPolicy, TestFlow, TokenId,
    TokenLifetime, TokenUses, UnixTime, WorkloadName,
};

/// meshlink's admin CLI: manage networks, join tokens, nodes and workloads on a coordinator.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, propagate_version = true)]
struct Cli {
    /// The coordinator's admin API. Several coordinators of one mesh: comma-separated, or the
    /// flag repeated; the next is used when one does not answer.
    #[arg(
        long,
        global = true,
        env = "MESHLINK_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_delimiter = ',',
        value_name = "URL"
    )]
    coordinator: Vec<CoordinatorUrl>,

    /// The admin token itself. Prefer --admin-token-file: a command line is visible to all
    /// local users.
    #[arg(
        long,
        global = true,
        env = "MESHLINK_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,

    /// A file holding the admin token; it must not be readable by group or others.
    #[arg(
        long,
        global = true,
        env = "MESHLINK_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    admin_token_file: Option<PathBuf>,

    /// How to print the answer.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t = Output::Table
    )]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// The coordinator's JSON, pretty-printed, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and list networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Create, list and revoke join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List, inspect, revoke and delete nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Workload addresses that move between nodes: create, attach, move, detach, claim.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// A network's access policy: set, get, history, rollback, clear, test.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Admin tokens with roles (read, operator, admin), for every network or one.
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCommand),
    /// The audit log: every admin change and every refused request, oldest first.
    Audit {
        /// Only entries this recent: a duration (1h, 2d) or Unix seconds.
        #[arg(long, value_name = "DURATION|TIME")]
        since: Option<String>,
        /// Only entries concerning this node (as requests named it) or made by it.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        node: Option<String>,
        /// At most this many, the newest [default: 100, at most 10000].
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// The relays: the coordinator's own and the standalone relays it vouches for.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// Show the coordinator's state.
    Status,
}

#[derive(Debug, Subcommand)]
enum RelayCommand {
    /// List the coordinator's embedded relay and its `[[relays]]` (name, address, region,
    /// provider, whether agents are told of them).
    List,
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Create a network.
    Create {
        /// The network's name: 1 to 63 of a-z, 0-9 and -.
        name: NetworkName,
        /// The overlay prefix its nodes get addresses from, for example 100.64.0.0/16.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        cidr: String,
        /// An IPv6 ULA /48 beside it (for example fd7a:115c:a1e0::/48), or `auto` for a random
        /// one: every node and workload also gets the /48 with its IPv4 address in the low 32
        /// bits. Only at creation.
        #[arg(long, value_name = "PREFIX|auto", value_parser = NonEmptyStringValueParser::new())]
        cidr6: Option<String>,
    },
    /// List networks.
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token and print its text (last line in table mode, `.token` in JSON).
    Create {
        /// The network the token enrolls nodes into.
        #[arg(long)]
        network: NetworkName,
        /// A tag for every node enrolled with the token; repeat for several.
        #[arg(long = "tag", value_name = "TAG", value_parser = NonEmptyStringValueParser::new())]
        tags: Vec<String>,
        /// How long the token stays valid: 90s, 30m, 1h, 2d, 1w, combined like 1h30m, or
        /// `never` [default: 1h].
        #[arg(long, value_name = "DURATION", value_parser = token_lifetime)]
        expires: Option<TokenLifetime>,
        /// How many nodes may enroll with it: a number, or `unlimited` [default: 1].
        #[arg(long, value_name = "N", value_parser = token_uses, allow_negative_numbers = true)]
        uses: Option<TokenUses>,
    },
    /// List join tokens (without their text).
    List,
    /// Revoke a join token.
    Revoke {
        /// The token's id, as `token list` shows it.
        id: TokenId,
    },
}

/// A node, named by id or name.
#[derive(Debug, Args)]
struct NodeRef {
    /// The node's id or name.
    #[arg(value_name = "NODE", value_parser = NonEmptyStringValueParser::new())]
    node: String,
    /// The network to look the name up in, when it is used in several.
    #[arg(long)]
    network: Option<NetworkName>,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List nodes.
    List {
        /// Only the nodes of this network.
        #[arg(long)]
        network: Option<NetworkName>,
    },
    /// Show one node.
    Show(NodeRef),
    /// Revoke a node: it is cut off from its peers and cannot reconnect.
    Revoke(NodeRef),
    /// Rotate a node's WireGuard key: its agent makes a new key pair, peers accept both keys
    /// for a grace period, then the node switches (connections through it survive). An
    /// external node is given its new key: --public-key, or --new-key.
    #[command(
        mut_arg("endpoint", |a| a.requires("new_key")),
        mut_arg("out", |a| a.requires("new_key")),
        mut_arg("qr", |a| a.requires("new_key"))
    )]
    RotateKey(RotateKeyArgs),
    /// Register a device that runs stock WireGuard (a phone, a router, an appliance) as a node
    /// reached through a node with an agent, its gateway, and print its WireGuard
    /// configuration.
    AddExternal(AddExternalArgs),
    /// Print an external node's WireGuard configuration again (with a line for its private
    /// key to fill in: meshctl keeps none).
    ExternalConfig {
        #[command(flatten)]
        node: NodeRef,
        #[command(flatten)]
        device: DeviceOutput,
    },
    /// Add (+TAG) and remove (-TAG) a node's tags, which policies select by.
    Tag {
        #[command(flatten)]
        node: NodeRef,
        /// Edits, applied in order: +TAG adds, -TAG removes.
        #[arg(value_name = "+TAG|-TAG", required = true, allow_hyphen_values = true)]
        edits: Vec<String>,
    },
    /// Delete a node.
    Delete(NodeRef),
}

/// `node rotate-key`.
#[derive(Debug, Args)]
struct RotateKeyArgs {
    #[command(flatten)]
    node: NodeRef,
    /// An external node's new public key, from a key pair its device made; the node uses it at
    /// once.
    #[arg(long, value_name = "KEY", conflicts_with = "new_key")]
    public_key: Option<PublicKey>,
    /// For an external node: make the new key pair here and print the new configuration, as
    /// add-external does.
    #[arg(long)]
    new_key: bool,
    #[command(flatten)]
    device: DeviceOutput,
}

/// `node add-external`.
#[derive(Debug, Args)]
struct AddExternalArgs {
    /// The node's name: 1 to 63 of a-z, 0-9 and -, not only digits.
    #[arg(value_name = "NAME")]
    name: NodeName,
    /// The network it joins.
    #[arg(long)]
    network: NetworkName,
    /// Its gateway: a node (name or id) of the network with an agent, which the device can
    /// reach and which forwards its packets.
    #[arg(long, value_name = "NODE", value_parser = NonEmptyStringValueParser::new())]
    via: String,
    /// The device's WireGuard public key, when it made its own key pair (preferred: its
    /// private key then never leaves it). Without it, meshctl makes the pair here.
    #[arg(long, value_name = "KEY")]
    public_key: Option<PublicKey>,
    /// A tag, which policies select by; repeat for several.
    #[arg(long = "tag", value_name = "TAG", value_parser = NonEmptyStringValueParser::new())]
    tags: Vec<String>,
    #[command(flatten)]
    device: DeviceOutput,
}

/// Where an external device reaches its gateway, and where its configuration goes.
#[derive(Debug, Args)]
struct DeviceOutput {
    /// Where the device reaches its gateway [default: the gateway's first endpoint].
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<Endpoint>,
    /// Write the configuration to this new file (mode 0600; an existing file is never
    /// overwritten) and print one line instead.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Show the configuration as a QR code, for a phone's WireGuard app to scan, instead of
    /// its text (with --out: besides the file).
    #[arg(long)]
    qr: bool,
}

/// A workload, named within a network.
#[derive(Debug, Args)]
struct WorkloadRef {
    /// The workload's name.
    #[arg(value_name = "NAME")]
    name: WorkloadName,
    /// The network it is in; needed only when the name is used in several.
    #[arg(long)]
    network: Option<NetworkName>,
}

#[derive(Debug, Subcommand)]
enum WorkloadCommand {
    /// Create a workload: an address of the network that belongs to it, detached until it is
    /// attached to a node.
    Create {
        /// The workload's name: 1 to 63 of a-z, 0-9 and -.
        name: WorkloadName,
        /// The network it belongs to.
        #[arg(long)]
        network: NetworkName,
        /// Its address; by default the lowest free address of the network.
        #[arg(long, value_name = "IP")]
        address: Option<Ipv4Addr>,
        /// Nodes (names or ids) to fail over to when the holder goes silent, in order;
        /// comma-separated or repeated.
        #[arg(
            long,
            value_name = "NODE,...",
            value_delimiter = ',',
            value_parser = NonEmptyStringValueParser::new()
        )]
        standby: Vec<String>,
        /// Nodes (names or ids) that may claim it themselves with `workload claim`;
        /// comma-separated or repeated.
        #[arg(
            long = "allow",
            value_name = "NODE,...",
            value_delimiter = ',',
            value_parser = NonEmptyStringValueParser::new()
        )]
        allowed: Vec<String>,
        /// A tag, which policies select by; repeat for several.
        #[arg(long = "tag", value_name = "TAG", value_parser = NonEmptyStringValueParser::new())]
        tags: Vec<String>,
    },
    /// Add (+TAG) and remove (-TAG) a workload's tags.
    Tag {
        #[command(flatten)]
        workload: WorkloadRef,
        /// Edits, applied in order: +TAG adds, -TAG removes.
        #[arg(value_name = "+TAG|-TAG", required = true, allow_hyphen_values = true)]
        edits: Vec<String>,
    },
    /// List workloads.
    List {
        /// Only the workloads of this network.
        #[arg(long)]
        network: Option<NetworkName>,
    },
    /// Show one workload.
    Show(WorkloadRef),
    /// Give a workload to a node (the same as move).
    Attach {
        #[command(flatten)]
        workload: WorkloadRef,
        /// The node (name or id) to hold it.
        #[arg(long, value_name = "NODE", value_parser = NonEmptyStringValueParser::new())]
        node: String,
    },
    /// Move a workload to another node; the old holder forwards in-flight packets to it.
    Move {
        #[command(flatten)]
        workload: WorkloadRef,
        /// The node (name or id) to hold it.
        #[arg(long, value_name = "NODE", value_parser = NonEmptyStringValueParser::new())]
        to: String,
    },
    /// Move a workload with its application's state: the application on the holder hands its
    /// open connections and data over to the same application on the destination before the
    /// address moves (it must be registered with its agent; see the README). Nothing moves
    /// when it cannot.
    Migrate {
        #[command(flatten)]
        workload: WorkloadRef,
        /// The node (name or id) to hold it.
        #[arg(long, value_name = "NODE", value_parser = NonEmptyStringValueParser::new())]
        to: String,
    },
    /// Take a workload from its holder: nobody answers for its address until it is attached.
    Detach(WorkloadRef),
    /// Delete a workload and free its address.
    Delete(WorkloadRef),
    /// Claim a workload for this VM's node, through the local agent (no admin token needed).
    Claim(ClaimArgs),
}

#[derive(Debug, Subcommand)]
enum AdminTokenCommand {
    /// Make an admin token and print its secret (last line in table mode, `.token` in JSON):
    /// the only time it is shown.
    Create {
        /// A unique name; the audit log names the token by it.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        name: String,
        /// read (lists and status), operator (also moves and join tokens) or admin
        /// (everything).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The one network it may act on; every network when left out.
        #[arg(long)]
        network: Option<NetworkName>,
    },
    /// List admin tokens (without secrets).
    List,
    /// Revoke an admin token.
    Revoke {
        /// The token's id, as `admin-token list` shows it.
        id: u64,
    },
}

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// Lists and status.
    Read,
    /// Also workload moves and join tokens.
    Operator,
    /// Everything.
    Admin,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Set a network's policy from a file (TOML; `-` reads stdin). The file is checked, and
    /// its [[test]] flows run, before anything changes.
    Set {
        /// The network.
        network: NetworkName,
        /// The policy file.
        file: PathBuf,
    },
    /// Show the policy in force.
    Get {
        /// The network.
        network: NetworkName,
    },
    /// List every version of a network's policy.
    History {
        /// The network.
        network: NetworkName,
    },
    /// Restore an earlier version (as a new version).
    Rollback {
        /// The network.
        network: NetworkName,
        /// The version to restore, as `policy history` lists it.
        #[arg(value_name = "VERSION")]
        to: u64,
    },
    /// Remove the policy: every flow in the network is allowed again.
    Clear {
        /// The network.
        network: NetworkName,
    },
    /// The verdict of the policy in force on one flow, and the rule that decided it.
    Test {
        /// The source: a node or workload name (node:NAME or workload:NAME when both exist).
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        from: String,
        /// The destination, the same way.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        to: String,
        /// tcp:PORT, udp:PORT or icmp.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        port: String,
        /// The network; needed only when the source's name is used in several.
        #[arg(long)]
        network: Option<NetworkName>,
    },
}

/// `workload claim`: everything is local to this VM.
#[derive(Debug, Args)]
struct ClaimArgs {
    /// The workload's name.
    #[arg(value_name = "NAME")]
    name: WorkloadName,
    /// The agent's interface; its socket is <UAPI_DIR>/<INTERFACE>.sock.
    #[arg(long, env = "MESHLINK_INTERFACE", default_value = "mesh0", value_parser = meshlink_uapi::parse_interface_name)]
    interface: String,
    /// The directory of the agent's userspace API socket.
    #[arg(
        long,
        env = "MESHLINK_UAPI_DIR",
        default_value = meshlink_uapi::DEFAULT_DIR,
        value_name = "DIR"
    )]
    uapi_dir: PathBuf,
    /// How long to wait for the agent's answer.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration::parse)]
    timeout: Duration,
}

/// `--uses`: a number of joins, at least 1, or `unlimited`.
fn token_uses(text: &str) -> Result<TokenUses, String> {
    match text {
        "unlimited" => Ok(TokenUses::Unlimited),
        _ => match text.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(TokenUses::Limit(n)),
            _ => Err("write a number of nodes, 1 or more, or unlimited".into()),
        },
    }
}

/// `--expires`: a duration such as `1h` or `30d`, or `never`.
fn token_lifetime(text: &str) -> Result<TokenLifetime, String> {
    match text {
        "never" => Ok(TokenLifetime::Never),
        _ => match duration::parse(text) {
            Ok(d) => Ok(TokenLifetime::Secs(d.as_secs())),
            Err(e @ duration::DurationError::Zero { .. }) => Err(e.to_string()),
            Err(e) => Err(format!("{e}; or never, for a token that does not expire")),
        },
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let source = TokenSource::of(&matches);
    match run(cli, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Every error is typed and says what happened in one line; the sources are
            // already part of that line.
            eprintln!("meshctl: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Which admin token option to use when both the inline and the file option are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenSource {
    /// Use the file (also when only the file is set, or neither).
    File,
    /// Use the inline token.
    Inline,
    /// Both came from the same place (both flags, or both variables): refuse to guess.
    Ambiguous,
}

impl TokenSource {
    /// A flag beats an environment variable, so `--admin-token` works in a shell that
    /// exports `MESHLINK_ADMIN_TOKEN_FILE`, and the other way round.
    fn of(matches: &ArgMatches) -> Self {
        let from_flag = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let (inline, file) = (
            matches.value_source("admin_token"),
            matches.value_source("admin_token_file"),
        );
        match (inline, file) {
            (Some(_), Some(_)) if from_flag("admin_token") == from_flag("admin_token_file") => {
                Self::Ambiguous
            }
            (Some(_), Some(_)) if from_flag("admin_token") => Self::Inline,
            (Some(_), None) => Self::Inline,
            _ => Self::File,
        }
    }
}

/// The admin token from the flag or the file, or an error saying how to give one.
fn admin_token(cli: &Cli, source: TokenSource) -> Result<AdminToken> {
    if source == TokenSource::Ambiguous {
        return Err(anyhow!(
            "both an admin token and an admin token file are given; pass only one"
        ));
    }
    match (&cli.admin_token_file, &cli.admin_token, source) {
        (Some(path), _, TokenSource::File) => Ok(AdminToken::from_file(path)?),
        (_, Some(token), TokenSource::Inline) => Ok(AdminToken::new(token, "--admin-token")?),
        _ => Err(anyhow!(
            "no admin token: pass --admin-token-file FILE (or set MESHLINK_ADMIN_TOKEN_FILE), \
             or --admin-token TOKEN (or set MESHLINK_ADMIN_TOKEN)"
        )),
    }
}

/// Now, for relative times.
fn now() -> UnixTime {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    UnixTime(seconds)
}

/// Prints an answer: the table text, or the server's JSON pretty-printed.
fn emit(output: Output, json: &Value, table: impl FnOnce() -> String) -> Result<()> {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(json)?),
    }
    Ok(())
}

/// Prints a confirmation for an answer without a body, in table mode only.
fn confirm(output: Output, message: String) {
    if output == Output::Table {
        println!("{message}");
    }
}

fn run(cli: Cli, source: TokenSource) -> Result<()> {
    let output = cli.output;
    // A claim goes to the local agent: no coordinator and no admin token.
    if let Command::Workload(WorkloadCommand::Claim(args)) = &cli.command {
        return claim_workload(output, args);
    }
    let urls = CoordinatorUrls::new(cli.coordinator.iter().cloned())
        .ok_or_else(|| anyhow!("no coordinator URL given"))?;
    let client = AdminClient::new(urls, admin_token(&cli, source)?);
    match cli.command {
        Command::Network(NetworkCommand::Create { name, cidr, cidr6 }) => {
            let cidr6 = match cidr6.as_deref() {
                Some("auto") => Some(random_ula()?.to_string()),
                _ => cidr6,
            };
            let reply = client.create_network(&CreateNetwork { name, cidr, cidr6 })?;
            emit(output, &reply.json, || {
                render::networks(std::slice::from_ref(&reply.value))
            })
        }
        Command::Network(NetworkCommand::List) => {
            let reply = client.networks()?;
            emit(output, &reply.json, || render::networks(&reply.value))
        }
        Command::Token(TokenCommand::Create {
            network,
            tags,
            expires,
            uses,
        }) => {
            let request = CreateToken {
                network,
                tags,
                expires_in_secs: expires,
                uses,
            };
            let reply = client.create_token(&request)?;
            if reply.value.token.is_empty() {
                return Err(anyhow!(
                    "the coordinator created token {} but did not return its text",
                    reply.value.id
                ));
            }
            emit(output, &reply.json, || {
                render::created_token(&reply.value, now())
            })
        }
        Command::Token(TokenCommand::List) => {
            let reply = client.tokens()?;
            emit(output, &reply.json, || render::tokens(&reply.value, now()))
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            client.revoke_token(id)?;
            confirm(output, format!("token {id} revoked"));
            Ok(())
        }
        Command::Node(NodeCommand::List { network }) => {
            let reply = client.nodes(network.as_deref())?;
            emit(output, &reply.json, || render::nodes(&reply.value, now()))
        }
        Command::Node(NodeCommand::Show(NodeRef { node, network })) => {
            let reply = client.node(&node, network.as_deref())?;
            emit(output, &reply.json, || render::node(&reply.value, now()))
        }
        Command::Node(NodeCommand::Revoke(NodeRef { node, network })) => {
            let reply = client.revoke_node(&node, network.as_deref())?;
            emit(output, &reply.json, || render::node(&reply.value, now()))
        }
        Command::Node(NodeCommand::RotateKey(args)) => rotate_key(&client, output, args),
        Command::Node(NodeCommand::AddExternal(args)) => add_external(&client, output, args),
        Command::Node(NodeCommand::ExternalConfig {
            node: NodeRef { node, network },
            device,
        }) => {
            refuse_qr_json(output, &device)?;
            let file = device.out.as_deref().map(PrivateFile::create).transpose()?;
            let reply = client.external(&node, network.as_deref())?;
            let config = DeviceConfig::new(&reply.value, None, device.endpoint.as_ref())
                .map_err(|e| anyhow!("external node {node}: {e}"))?;
            deliver(output, &reply, &config, device.qr, file, DeviceChange::None)
        }
        Command::Node(NodeCommand::Tag {
            node: NodeRef { node, network },
            edits,
        }) => {
            let reply = client.tag_node(&node, network.as_deref(), edits)?;
            emit(output, &reply.json, || render::node(&reply.value, now()))
        }
        Command::Policy(command) => policy(&client, output, command),
        Command::AdminToken(AdminTokenCommand::Create {
            name,
            role,
            network,
        }) => {
            let role = match role {
                RoleArg::Read => Role::Read,
                RoleArg::Operator => Role::Operator,
                RoleArg::Admin => Role::Admin,
            };
            let reply = client.create_admin_token(&CreateAdminToken {
                name,
                role,
                network,
            })?;
            emit(output, &reply.json, || {
                render::created_admin_token(&reply.value)
            })
        }
        Command::AdminToken(AdminTokenCommand::List) => {
            let reply = client.admin_tokens()?;
            emit(output, &reply.json, || {
                render::admin_tokens(&reply.value, now())
            })
        }
        Command::AdminToken(AdminTokenCommand::Revoke { id }) => {
            client.revoke_admin_token(id)?;
            confirm(output, format!("admin token {id} revoked"));
            Ok(())
        }
        Command::Audit { since, node, limit } => {
            let since = since.map(|s| since_time(&s)).transpose()?;
            let reply = client.audit(&AuditFilter { since, node, limit })?;
            emit(output, &reply.json, || render::audit(&reply.value))
        }
        Command::Node(NodeCommand::Delete(NodeRef { node, network })) => {
            client.delete_node(&node, network.as_deref())?;
            confirm(output, format!("node {node} deleted"));
            Ok(())
        }
        Command::Workload(command) => workload(&client, output, command),
        Command::Relay(RelayCommand::List) => {
            let reply = client.relays()?;
            emit(output, &reply.json, || render::relays(&reply.value))
        }
        Command::Status => {
            let reply = client.status()?;
            emit(output, &reply.json, || render::status(&reply.value))
        }
    }
}

fn workload(client: &AdminClient, output: Output, command: WorkloadCommand) -> Result<()> {
    match command {
        WorkloadCommand::Create {
            name,
            network,
            address,
            standby,
            allowed,
            tags,
        } => {
            let request = CreateWorkload {
                name,
                network,
                address,
                standby,
                allowed,
                tags,
            };
            let reply = client.create_workload(&request)?;
            emit(output, &reply.json, || {
                render::workload(&reply.value, now())
            })
        }
        WorkloadCommand::Tag { workload, edits } => {
            let reply = client.tag_workload(&workload.name, workload.network.as_deref(), edits)?;
            emit(output, &reply.json, || {
                render::workload(&reply.value, now())
            })
        }
        WorkloadCommand::List { network } => {
            let reply = client.workloads(network.as_deref())?;
            emit(output, &reply.json, || render::workloads(&reply.value))
        }
        WorkloadCommand::Show(WorkloadRef { name, network }) => {
            let reply = client.workload(&name, network.as_deref())?;
            emit(output, &reply.json, || {
                render::workload(&reply.value, now())
            })
        }
        WorkloadCommand::Attach { workload, node } => {
            let reply =
                client.attach_workload(&workload.name, &node, workload.network.as_deref())?;
            emit(output, &reply.json, || {
                render::moved(&reply.value, Change::Attach)
            })
        }
        WorkloadCommand::Move { workload, to } => {
            let reply = client.move_workload(&workload.name, &to, workload.network.as_deref())?;
            emit(output, &reply.json, || {
                render::moved(&reply.value, Change::Move)
            })
        }
        WorkloadCommand::Migrate { workload, to } => {
            let reply =
                client.migrate_workload(&workload.name, &to, workload.network.as_deref())?;
            emit(output, &reply.json, || {
                render::moved(&reply.value, Change::Migrate)
            })
        }
        WorkloadCommand::Detach(WorkloadRef { name, network }) => {
            let reply = client.detach_workload(&name, network.as_deref())?;
            emit(output, &reply.json, || {
                render::moved(&reply.value, Change::Detach)
            })
        }
        WorkloadCommand::Delete(WorkloadRef { name, network }) => {
            client.delete_workload(&name, network.as_deref())?;
            confirm(output, format!("workload {name} deleted"));
            Ok(())
        }
        WorkloadCommand::Claim(args) => claim_workload(output, &args),
    }
}

fn policy(client: &AdminClient, output: Output, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Set { network, file } => {
            let source = read_policy_file(&file)?;
            let reply = client.set_policy(&network, &SetPolicy { source })?;
            emit(output, &reply.json, || render::policy_changed(&reply.value))
        }
        PolicyCommand::Get { network } => {
            let reply = client.policy(&network)?;
            emit(output, &reply.json, || render::policy(&reply.value))
        }
        PolicyCommand::History { network } => {
            let reply = client.policy_history(&network)?;
            emit(output, &reply.json, || render::policy_history(&reply.value))
        }
        PolicyCommand::Rollback { network, to } => {
            let reply = client.rollback_policy(&network, to)?;
            emit(output, &reply.json, || render::policy_changed(&reply.value))
        }
        PolicyCommand::Clear { network } => {
            let reply = client.clear_policy(&network)?;
            emit(output, &reply.json, || render::policy_changed(&reply.value))
        }
        PolicyCommand::Test {
            from,
            to,
            port,
            network,
        } => {
            let reply = client.test_flow(&TestFlow {
                network,
                from,
                to,
                port,
            })?;
            emit(output, &reply.json, || render::verdict(&reply.value))
        }
    }
}

/// `node add-external`. A path for `--out` is claimed first and a key pair made, before the
/// coordinator is asked anything; once the node is registered, a configuration that cannot be
/// made (no endpoint for the gateway) is an error that says so and how to go on.
fn add_external(client: &AdminClient, output: Output, args: AddExternalArgs) -> Result<()> {
    let AddExternalArgs {
        name,
        network,
        via,
        public_key,
        tags,
        device,
    } = args;
    refuse_qr_json(output, &device)?;
    let file = device.out.as_deref().map(PrivateFile::create).transpose()?;
    let (public_key, made) = match public_key {
        Some(key) => (key, None),
        None => {
            let key = DeviceKey::generate()?;
            (key.public_key(), Some(key))
        }
    };
    let request = CreateExternalNode {
        name: name.clone(),
        network: network.clone(),
        public_key,
        via,
        tags,
    };
    let reply = client.add_external(&request)?;
    let config =
        DeviceConfig::new(&reply.value, made.as_ref(), device.endpoint.as_ref()).map_err(|e| {
            let again = if made.is_some() {
                format!(
                    "the key pair made for it was not kept: make a new one and print the \
                     configuration with `meshctl node rotate-key {name} --network {network} \
                     --new-key --endpoint HOST:PORT`"
                )
            } else {
                format!(
                    "print its configuration with `meshctl node external-config {name} \
                     --network {network} --endpoint HOST:PORT`"
                )
            };
            anyhow!("external node {name} is registered, but {e}; {again}")
        })?;
    deliver(
        output,
        &reply,
        &config,
        device.qr,
        file,
        DeviceChange::Registered,
    )
}

/// `node rotate-key`. With `--new-key`, the external node's configuration is asked for first,
/// so that a node with an agent, or a gateway with no endpoint, stops the command before the
/// key changes: the private key made here is kept nowhere but in the configuration printed.
fn rotate_key(client: &AdminClient, output: Output, args: RotateKeyArgs) -> Result<()> {
    let RotateKeyArgs {
        node: NodeRef { node, network },
        public_key,
        new_key,
        device,
    } = args;
    if !new_key {
        let reply = client.rotate_key(&node, network.as_deref(), public_key)?;
        return emit(output, &reply.json, || render::node(&reply.value, now()));
    }
    refuse_qr_json(output, &device)?;
    let mut external = client.external(&node, network.as_deref())?;
    let key = DeviceKey::generate()?;
    let config = DeviceConfig::new(&external.value, Some(&key), device.endpoint.as_ref())
        .map_err(|e| anyhow!("external node {node}: {e}; its key was not changed"))?;
    let file = device.out.as_deref().map(PrivateFile::create).transpose()?;
    // By id: the node just found, whatever its name is used for elsewhere.
    let id = external.value.node.id.to_string();
    let rotated = client.rotate_key(&id, None, Some(key.public_key()))?;
    external.value.node = rotated.value;
    external.json["node"] = rotated.json;
    deliver(
        output,
        &external,
        &config,
        device.qr,
        file,
        DeviceChange::NewKey,
    )
}

/// `--qr` draws on the terminal; JSON is for scripts.
fn refuse_qr_json(output: Output, device: &DeviceOutput) -> Result<()> {
    if device.qr && output == Output::Json {
        return Err(anyhow!(
            "--qr draws the configuration on the terminal: leave out -o json"
        ));
    }
    Ok(())
}

/// Shows an external device's configuration: its text on stdout, or its QR code (`qr`), or
/// into `file` with one line saying so (and the QR code); in JSON mode, the coordinator's
/// answer with the text or the file's path.
fn deliver(
    output: Output,
    external: &Reply<ExternalNode>,
    config: &DeviceConfig,
    qr: bool,
    file: Option<PrivateFile>,
    change: DeviceChange,
) -> Result<()> {
    let saved = match file {
        Some(file) => {
            let path = file.path().to_owned();
            match file.write(config.text()) {
                Ok(()) => Some(path),
                // The coordinator has the public key already: the private key made here must
                // not be lost with the file.
                Err(e) if config.has_private_key() => {
                    print!("{}", config.text());
                    return Err(anyhow!(
                        "{e}; the configuration, with its private key, is printed above \
                         instead: save it now (the coordinator has its public key)"
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        None => None,
    };
    if output == Output::Json {
        let mut json = serde_json::json!({ "external_node": external.json });
        match &saved {
            Some(path) => json["file"] = path.display().to_string().into(),
            None => json["wg_quick"] = config.text().into(),
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    if let Some(path) = &saved {
        print!(
            "{}",
            render::device_config_saved(&external.value, change, config.endpoint(), path)
        );
    }
    if qr {
        println!("{}", config.qr_code()?);
        if !config.has_private_key() {
            eprintln!(
                "meshctl: note: the QR code has no private key (the device made its own pair), \
                 and a WireGuard app takes none without one: enter the [Peer] section in the \
                 device's own tunnel instead"
            );
        }
    } else if saved.is_none() {
        print!("{}", config.text());
    }
    Ok(())
}

/// `--since`: Unix seconds, or a duration back from now.
fn since_time(text: &str) -> Result<i64> {
    if let Ok(t) = text.parse::<i64>() {
        return Ok(t);
    }
    let back =
        duration::parse(text).map_err(|e| anyhow!("--since {text:?}: {e}; or Unix seconds"))?;
    Ok(now().0 - i64::try_from(back.as_secs()).unwrap_or(i64::MAX / 2))
}

/// A policy file's text (`-`: standard input), refused with its name when unreadable or not
/// UTF-8.
fn read_policy_file(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    if path == std::path::Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| anyhow!("standard input: {e}"))?;
    } else {
        text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    Ok(text)
}

/// `workload claim`: asks the local agent; in JSON mode prints
/// `{"workload", "generation", "took_ms"}`.
fn claim_workload(output: Output, args: &ClaimArgs) -> Result<()> {
    let socket = meshlink_uapi::socket_path(&args.uapi_dir, &args.interface);
    let claimed = claim::claim(&socket, &args.name, args.timeout)?;
    let json = serde_json::json!({
        "workload": args.name,
        "generation": claimed.generation,
        "took_ms": claimed.took.as_secs_f64() * 1000.0,
    });
    emit(output, &json, || {
        render::claimed(&args.name, claimed.generation, claimed.took)
    })
}

/// A random ULA /48 (RFC 4193) for `network create --cidr6 auto`, from the operating system's
/// random source.
fn random_ula() -> Result<ipnet::Ipv6Net> {
    use rand_core::{OsRng, RngCore};
    let mut id = [0u8; 5];
    OsRng
        .try_fill_bytes(&mut id)
        .map_err(|e| anyhow::anyhow!("cidr6 auto: the random source failed: {e}"))?;
    Ok(meshlink_proto::ipam::ula_from(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn token_create_arguments() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "token",
            "create",
            "--network",
            "prod",
            "--tag",
            "web",
            "--tag",
            "eu",
            "--expires",
            "1h30m",
            "--uses",
            "3",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.output, Output::Json);
        let Command::Token(TokenCommand::Create {
            network,
            tags,
            expires,
            uses,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(network, "prod");
        assert_eq!(tags, ["web", "eu"]);
        assert_eq!(expires, Some(TokenLifetime::Secs(5_400)));
        assert_eq!(uses, Some(TokenUses::Limit(3)));
    }

    #[test]
    fn token_create_limits() {
        let limits = |extra: &[&str]| {
            let mut args = vec!["meshctl", "token", "create", "--network", "prod"];
            args.extend(extra);
            match Cli::try_parse_from(args).map(|cli| cli.command) {
                Ok(Command::Token(TokenCommand::Create { expires, uses, .. })) => {
                    Ok((expires, uses))
                }
                Ok(other) => panic!("parsed as {other:?}"),
                Err(e) => Err(e.kind()),
            }
        };
        // Left out: the coordinator's defaults (one use, one hour) apply.
        assert_eq!(limits(&[]), Ok((None, None)));
        assert_eq!(
            limits(&["--uses", "unlimited", "--expires", "never"]),
            Ok((Some(TokenLifetime::Never), Some(TokenUses::Unlimited)))
        );
        assert_eq!(
            limits(&["--uses", "10", "--expires", "30d"]),
            Ok((
                Some(TokenLifetime::Secs(30 * 86_400)),
                Some(TokenUses::Limit(10))
            ))
        );
        for bad in [
            &["--uses", "0"][..],
            &["--uses", "-1"],
            &["--uses", "Unlimited"],
            &["--uses", ""],
            &["--expires", "0s"],
            &["--expires", "forever"],
        ] {
            assert_eq!(
                limits(bad),
                Err(clap::error::ErrorKind::ValueValidation),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn workload_arguments() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "workload",
            "create",
            "chat",
            "--network",
            "prod",
            "--address",
            "100.64.50.10",
            "--standby",
            "vm-d,vm-e",
            "--standby",
            "vm-f",
            "--allow",
            "vm-c",
            "--tag",
            "app",
        ])
        .unwrap();
        let Command::Workload(WorkloadCommand::Create {
            name,
            network,
            address,
            standby,
            allowed,
            tags,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!((name.as_str(), network.as_str()), ("chat", "prod"));
        assert_eq!(address, Some(Ipv4Addr::new(100, 64, 50, 10)));
        assert_eq!(standby, ["vm-d", "vm-e", "vm-f"]);
        assert_eq!(allowed, ["vm-c"]);
        assert_eq!(tags, ["app"]);

        // Tag edits start with a sign, which is not an option.
        let cli = Cli::try_parse_from(["meshctl", "node", "tag", "vm-a", "+db", "-web"]).unwrap();
        let Command::Node(NodeCommand::Tag { node, edits }) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (node.node.as_str(), edits),
            ("vm-a", vec!["+db".to_string(), "-web".into()])
        );
        let cli = Cli::try_parse_from([
            "meshctl", "policy", "test", "--from", "vm-a", "--to", "chat", "--port", "tcp:7070",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Policy(PolicyCommand::Test { .. })
        ));

        let cli =
            Cli::try_parse_from(["meshctl", "workload", "move", "chat", "--to", "vm-c"]).unwrap();
        let Command::Workload(WorkloadCommand::Move { workload, to }) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (workload.name.as_str(), workload.network, to.as_str()),
            ("chat", None, "vm-c")
        );

        let cli = Cli::try_parse_from(["meshctl", "workload", "migrate", "chat", "--to", "vm-c"])
            .unwrap();
        let Command::Workload(WorkloadCommand::Migrate { workload, to }) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!((workload.name.as_str(), to.as_str()), ("chat", "vm-c"));

        let cli = Cli::try_parse_from(["meshctl", "workload", "claim", "chat"]).unwrap();
        let Command::Workload(WorkloadCommand::Claim(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.interface, "mesh0");
        assert_eq!(args.uapi_dir, PathBuf::from("/var/run/wireguard"));
        assert_eq!(args.timeout, claim::DEFAULT_TIMEOUT);
    }

    #[test]
    fn external_node_arguments() {
        let key = "QgkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
        let cli = Cli::try_parse_from([
            "meshctl",
            "node",
            "add-external",
            "phone",
            "--network",
            "prod",
            "--via",
            "vm-a",
            "--public-key",
            key,
            "--tag",
            "mobile",
            "--endpoint",
            "gw.example.com:51820",
            "--out",
            "phone.conf",
            "--qr",
        ])
        .unwrap();
        let Command::Node(NodeCommand::AddExternal(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (args.name.as_str(), args.network.as_str()),
            ("phone", "prod")
        );
        assert_eq!(args.via, "vm-a");
        assert_eq!(args.public_key.map(|k| k.to_string()), Some(key.to_owned()));
        assert_eq!(args.tags, ["mobile"]);
        assert_eq!(
            args.device.endpoint.map(|e| e.to_string()),
            Some("gw.example.com:51820".to_owned())
        );
        assert_eq!(args.device.out, Some(PathBuf::from("phone.conf")));
        assert!(args.device.qr);

        let cli = Cli::try_parse_from([
            "meshctl",
            "node",
            "rotate-key",
            "phone",
            "--new-key",
            "--qr",
        ])
        .unwrap();
        let Command::Node(NodeCommand::RotateKey(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert!(args.new_key && args.device.qr && args.public_key.is_none());

        let kind = |args: &[&str]| Cli::try_parse_from(args).map(drop).map_err(|e| e.kind());
        use clap::error::ErrorKind;
        // The configuration's options go with a key made here, not with one given or none.
        for option in [&["--out", "f"][..], &["--qr"], &["--endpoint", "gw:1"]] {
            let mut args = vec!["meshctl", "node", "rotate-key", "phone"];
            args.extend(option);
            assert_eq!(
                kind(&args),
                Err(ErrorKind::MissingRequiredArgument),
                "{option:?}"
            );
        }
        assert_eq!(
            kind(&[
                "meshctl",
                "node",
                "rotate-key",
                "phone",
                "--new-key",
                "--public-key",
                key
            ]),
            Err(ErrorKind::ArgumentConflict)
        );
        for bad in [
            &[
                "meshctl",
                "node",
                "add-external",
                "phone",
                "--network",
                "prod",
            ][..],
            &[
                "meshctl",
                "node",
                "add-external",
                "123",
                "--network",
                "prod",
                "--via",
                "vm-a",
            ],
            &[
                "meshctl",
                "node",
                "add-external",
                "phone",
                "--network",
                "prod",
                "--via",
                "vm-a",
                "--public-key",
                "AAAA",
            ],
            &[
                "meshctl",
                "node",
                "add-external",
                "phone",
                "--network",
                "prod",
                "--via",
                "vm-a",
                "--endpoint",
                "gw",
            ],
            &[
                "meshctl",
                "node",
                "external-config",
                "phone",
                "--endpoint",
                "[::1]",
            ],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn several_coordinators_comma_separated_or_repeated() {
        let urls = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            CoordinatorUrls::new(cli.coordinator).unwrap().to_string()
        };
        assert_eq!(urls(&["meshctl", "status"]), DEFAULT_COORDINATOR);
        assert_eq!(
            urls(&[
                "meshctl",
                "--coordinator",
                "http://10.0.0.1:7444,10.0.0.2:7444",
                "--coordinator",
                "http://10.0.0.3:7444/",
                "--coordinator",
                "http://10.0.0.1:7444",
                "status",
            ]),
            "http://10.0.0.1:7444,http://10.0.0.2:7444,http://10.0.0.3:7444"
        );
        assert_eq!(
            urls(&[
                "meshctl",
                "node",
                "list",
                "--coordinator",
                "http://10.0.0.2:7444",
                "--coordinator",
                "http://10.0.0.1:7444",
            ]),
            "http://10.0.0.2:7444,http://10.0.0.1:7444"
        );
        for bad in [
            "http://a:1,,http://b:2",
            "http://a:1,",
            "http://a:1,https://b:2",
        ] {
            assert!(
                Cli::try_parse_from(["meshctl", "--coordinator", bad, "status"]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_flag_beats_a_variable_for_the_token() {
        let source = |args: &[&str]| TokenSource::of(&Cli::command().get_matches_from(args));
        assert_eq!(source(&["meshctl", "status"]), TokenSource::File);
        assert_eq!(
            source(&["meshctl", "status", "--admin-token", "t"]),
            TokenSource::Inline
        );
        assert_eq!(
            source(&["meshctl", "status", "--admin-token-file", "f"]),
            TokenSource::File
        );
        assert_eq!(
            source(&[
                "meshctl",
                "--admin-token",
                "t",
                "status",
                "--admin-token-file",
                "f"
            ]),
            TokenSource::Ambiguous
        );
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            &[
                "meshctl",
                "token",
                "create",
                "--network",
                "p",
                "--expires",
                "soon",
            ][..],
            &[
                "meshctl",
                "token",
                "create",
                "--network",
                "p",
                "--uses",
                "0",
            ],
            &["meshctl", "node", "show", ""],
            &["meshctl", "token", "revoke", "abc"],
            &["meshctl", "--coordinator", "https://c:7444", "status"],
            &["meshctl", "status", "-o", "yaml"],
            &[
                "meshctl",
                "workload",
                "create",
                "chat",
                "--network",
                "p",
                "--address",
                "10.0.0.1/32",
            ],
            &["meshctl", "workload", "create", "chat"],
            &["meshctl", "workload", "attach", "chat"],
            &["meshctl", "workload", "move", "chat", "--node", "vm-c"],
            &[
                "meshctl",
                "workload",
                "claim",
                "chat",
                "--interface",
                "../x",
            ],
            &["meshctl", "workload", "claim", "a\nb"],
            &[
                "meshctl",
                "network",
                "create",
                "Prod",
                "--cidr",
                "100.64.0.0/16",
            ],
            &["meshctl", "node", "list", "--network", "prod eu"],
            &["meshctl", "policy", "get", "a_b"],
            &["meshctl", "workload", "show", "chat.v2"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        // A name that breaks the rule is refused with the rule.
        let err = Cli::try_parse_from(["meshctl", "network", "create", "Prod", "--cidr", "x"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "network name \"Prod\" is not valid: use 1 to 63 characters of a-z, 0-9 and -"
            ),
            "{err}"
        );
    }
}

//! Apache Kafka nodes of a test's own, from the jars `deploy/local/stack.sh`
//! installs (`TICKPIPE_KAFKA_HOME`, exported by `make test`): one node behind
//! a proxy, or a KRaft cluster of several, each node broker and controller in
//! one process, so that a test can kill -9 a node and bring it back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stack::{free_loopback_addr, unique_name};

/// Where the Kafka jars are (`<home>/libs`, `<home>/log4j2.properties`).
pub fn kafka_home() -> PathBuf {
    let home = std::env::var("TICKPIPE_KAFKA_HOME").unwrap_or_default();
    let path = PathBuf::from(&home);
    assert!(
        path.join("libs").is_dir(),
        "no Apache Kafka at TICKPIPE_KAFKA_HOME={home:?}: run the tests through `make test`, \
         or export TICKPIPE_KAFKA_HOME=\"$(deploy/local/stack.sh kafka-home)\""
    );
    path
}

/// One node: its ports, folder and process.
struct Node {
    id: u32,
    /// The clients' listener.
    client: SocketAddr,
    /// What the node advertises to clients (the listener, or a proxy in front).
    advertised: SocketAddr,
    /// Replication between brokers.
    internal: SocketAddr,
    /// The KRaft controllers' listener.
    controller: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

/// A KRaft cluster of `n` nodes on loopback, every node a voter. Killed and
/// removed on drop.
pub struct KafkaCluster {
    home: PathBuf,
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl KafkaCluster {
    /// Formats and starts `n` nodes with replication defaults fit for `n`
    /// (`default.replication.factor` and the internal topics' factor `n`,
    /// `min.insync.replicas` `n - 1` from three nodes on); waits until every
    /// node serves.
    pub fn start(n: usize) -> Self {
        let advertised: Vec<Option<SocketAddr>> = vec![None; n];
        Self::start_with(&advertised, &[])
    }

    /// `advertised[i]`, when given, is what node `i` tells clients to connect
    /// to (a proxy in front of its listener); `extra` are more
    /// `server.properties` lines for every node.
    pub fn start_with(advertised: &[Option<SocketAddr>], extra: &[&str]) -> Self {
        let home = kafka_home();
        let n = advertised.len();
        assert!(n >= 1, "a cluster has a node");
        let dir = std::env::temp_dir().join(unique_name("tickpipe-kafka"));
        let nodes: Vec<Node> = advertised
            .iter()
            .enumerate()
            .map(|(i, adv)| {
                let client = free_loopback_addr();
                Node {
                    id: i as u32 + 1,
                    client,
                    advertised: adv.unwrap_or(client),
                    internal: free_loopback_addr(),
                    controller: free_loopback_addr(),
                    dir: dir.join(format!("node-{}", i + 1)),
                    child: None,
                }
            })
            .collect();
        let voters = nodes
            .iter()
            .map(|n| format!("{}@{}", n.id, n.controller))
            .collect::<Vec<_>>()
            .join(",");
        let rf = n.min(3);
        let min_isr = if rf >= 3 { rf - 1 } else { 1 };
        let mut cluster = KafkaCluster { home, dir, nodes };
        let id = cluster.tool(&["kafka.tools.StorageTool", "random-uuid"]);
        let id = id.trim().to_owned();
        for node in &cluster.nodes {
            std::fs::create_dir_all(node.dir.join("data")).expect("node folder");
            let mut props = vec![
                "process.roles=broker,controller".to_owned(),
                format!("node.id={}", node.id),
                format!(
                    "listeners=CLIENT://{},INTERNAL://{},CONTROLLER://{}",
                    node.client, node.internal, node.controller
                ),
                format!(
                    "advertised.listeners=CLIENT://{},INTERNAL://{}",
                    node.advertised, node.internal
                ),
                "listener.security.protocol.map=CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT".to_owned(),
                "inter.broker.listener.name=INTERNAL".to_owned(),
                "controller.listener.names=CONTROLLER".to_owned(),
                format!("controller.quorum.voters={voters}"),
                format!("log.dirs={}", node.dir.join("data").display()),
                format!("default.replication.factor={rf}"),
                format!("min.insync.replicas={min_isr}"),
                format!("offsets.topic.replication.factor={rf}"),
                format!("transaction.state.log.replication.factor={rf}"),
                format!("transaction.state.log.min.isr={min_isr}"),
                format!("share.coordinator.state.topic.replication.factor={rf}"),
                format!("share.coordinator.state.topic.min.isr={min_isr}"),
                "group.initial.rebalance.delay.ms=0".to_owned(),
                "auto.create.topics.enable=false".to_owned(),
            ];
            props.extend(extra.iter().map(|s| s.to_string()));
            let file = node.dir.join("server.properties");
            std::fs::write(&file, props.join("\n") + "\n").expect("server.properties");
            let path = file.to_str().expect("utf-8 path").to_owned();
            cluster.tool(&["kafka.tools.StorageTool", "format", "-t", &id, "-c", &path]);
        }
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_serving(i, 0);
        }
        cluster
    }

    fn java(&self) -> Command {
        let mut cmd = Command::new("java");
        cmd.args(["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.home.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/libs/*", self.home.display()));
        cmd
    }

    /// Runs a Kafka tool class to its end and returns what it printed.
    fn tool(&self, args: &[&str]) -> String {
        let out = self
            .java()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("java {args:?}: {e}"));
        assert!(
            out.status.success(),
            "java {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("kafka.log")
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .expect("node log");
        let err = log.try_clone().expect("node log");
        let child = self
            .java()
            .arg("kafka.Kafka")
            .arg(self.nodes[i].dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("java kafka.Kafka: {e}"));
        self.nodes[i].child = Some(child);
    }

    /// How many times node `i`'s log says it started.
    fn starts(&self, i: usize) -> usize {
        std::fs::read_to_string(self.log(i))
            .unwrap_or_default()
            .matches("Kafka Server started")
            .count()
    }

    /// Waits until node `i` has started once more than `before` (its log says
    /// so) and takes connections; fails with its log's tail if it exits.
    fn wait_serving(&mut self, i: usize, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.starts(i) > before && std::net::TcpStream::connect(self.nodes[i].client).is_ok() {
                return;
            }
            let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
            if let Some(status) = self.nodes[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("Kafka node {} exited ({status}):\n{}", self.nodes[i].id, tail(&text));
            }
            assert!(
                Instant::now() < deadline,
                "Kafka node {} did not start within 120 s:\n{}",
                self.nodes[i].id,
                tail(&text)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The bootstrap servers: every node's advertised client address.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.advertised.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id`'s own client listener (behind any proxy).
    pub fn listener(&self, id: u32) -> SocketAddr {
        self.node(id).client
    }

    fn index(&self, id: u32) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no Kafka node {id}"))
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[self.index(id)]
    }

    /// kill -9 of node `id`: no shutdown, no flush, no goodbye to the quorum.
    pub fn kill(&mut self, id: u32) {
        let i = self.index(id);
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `id` again on its folder and ports; waits until it serves.
    pub fn restart(&mut self, id: u32) {
        let i = self.index(id);
        assert!(self.nodes[i].child.is_none(), "Kafka node {id} is running");
        let before = self.starts(i);
        self.spawn(i);
        self.wait_serving(i, before);
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

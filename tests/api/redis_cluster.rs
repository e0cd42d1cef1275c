//! A Redis Cluster of a test's own on loopback: three masters with a replica each,
//! from `redis-server` and `redis-cli --cluster create` on free ports. Nodes can be
//! killed (SIGKILL), restarted and failed over by hand.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::processes::PrivateRedis;

pub struct PrivateCluster {
    nodes: Vec<PrivateRedis>,
}

/// One line of `CLUSTER NODES`, as far as the tests need it.
#[derive(Debug, Clone)]
pub struct Node {
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// Slot ranges it serves (masters only), inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl PrivateCluster {
    /// Three masters, one replica each; returns once every node agrees the cluster
    /// is up and every replica is in sync.
    pub async fn start() -> Self {
        let mut nodes = Vec::with_capacity(6);
        for _ in 0..6 {
            nodes.push(PrivateRedis::cluster_node().await);
        }
        let cluster = Self { nodes };
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (apt-get install redis-tools)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_healthy(Duration::from_secs(30)).await;
        // As the shipped files: a master without a replica in sync takes no write,
        // so a sale it could not have acknowledged is never made.
        cluster.configure("min-replicas-to-write", "1").await;
        cluster
    }

    /// `CONFIG SET name value` on every node.
    pub async fn configure(&self, name: &str, value: &str) {
        for i in 0..self.nodes.len() {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut self.connect(i).await)
                .await
                .unwrap();
        }
    }

    /// The seed nodes, as `REDIS_URL` takes them with `BOXOFFICE_REDIS_CLUSTER`.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[i].port())
    }

    /// A plain connection to node `i`.
    pub async fn connect(&self, i: usize) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.node_url(i))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The cluster as a live node sees it.
    pub async fn topology(&self) -> Vec<Node> {
        for i in 0..self.nodes.len() {
            let Some(mut conn) = self.try_connect(i).await else {
                continue;
            };
            let nodes: redis::RedisResult<String> = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await;
            if let Ok(nodes) = nodes {
                return nodes.lines().filter_map(parse_node).collect();
            }
        }
        panic!("no node of the cluster answers");
    }

    /// The index of the node that serves `key`'s slot now as a master.
    pub async fn master_of(&self, key: &str) -> usize {
        self.live_master_of(key)
            .await
            .unwrap_or_else(|| panic!("no live master serves {key}"))
    }

    /// The index of the live master that serves `key`'s slot, if one does.
    pub async fn live_master_of(&self, key: &str) -> Option<usize> {
        let slot = self.slot_of(key).await;
        let owner = self.topology().await.into_iter().find(|n| {
            n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
        })?;
        Some(self.index_of(owner.port))
    }

    /// The slot of `key`, as the cluster computes it.
    pub async fn slot_of(&self, key: &str) -> u16 {
        for i in 0..self.nodes.len() {
            if let Some(mut conn) = self.try_connect(i).await
                && let Ok(slot) = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
            {
                return slot;
            }
        }
        panic!("no node of the cluster answers");
    }

    /// The index of the replica of the master at index `master`.
    pub async fn replica_of(&self, master: usize) -> usize {
        let mut conn = self.connect(master).await;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .unwrap();
        let port = info
            .lines()
            .find_map(|line| {
                let fields = line.strip_prefix("slave0:")?;
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix("port="))?
                    .parse()
                    .ok()
            })
            .expect("the master has a replica");
        self.index_of(port)
    }

    /// Moves the slot of `key` from master `from` to master `to`, keys and all, while
    /// the cluster serves: the steps `redis-cli --cluster reshard` takes for each
    /// slot, a few keys at a time with a pause between, so requests meet the slot
    /// half moved.
    pub async fn move_slot(&self, key: &str, from: usize, to: usize) {
        let slot = self.slot_of(key).await;
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let (mut source, mut target) = (self.connect(from).await, self.connect(to).await);
        let setslot = |state: &str, node: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(node)
                .to_owned()
        };
        let _: () = setslot("IMPORTING", &from_id)
            .query_async(&mut target)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", &to_id)
            .query_async(&mut source)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(10)
                .query_async(&mut source)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut source)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _: () = setslot("NODE", &to_id)
            .query_async(&mut target)
            .await
            .unwrap();
        let _: () = setslot("NODE", &to_id)
            .query_async(&mut source)
            .await
            .unwrap();
    }

    async fn node_id(&self, i: usize) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut self.connect(i).await)
            .await
            .unwrap()
    }

    /// Stalls node `i` (SIGSTOP), or lets it go on (SIGCONT).
    pub fn stall(&self, i: usize, stalled: bool) {
        self.nodes[i].run(!stalled);
    }

    /// SIGKILL of node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its files: it rejoins, as a replica of whoever took
    /// its slots over.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
    }

    /// Waits until every node that runs sees the cluster up, with a live master for
    /// every slot and every live master's replica in sync.
    pub async fn wait_until_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.healthy().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up: {:?}",
                self.topology().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthy(&self) -> bool {
        for i in 0..self.nodes.len() {
            let Some(mut conn) = self.try_connect(i).await else {
                continue;
            };
            let info: String = match redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
            {
                Ok(info) => info,
                Err(_) => return false,
            };
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return false;
            }
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return false;
            }
        }
        true
    }

    async fn try_connect(&self, i: usize) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.node_url(i)).ok()?;
        tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()
    }

    fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|node| node.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }
}

fn parse_node(line: &str) -> Option<Node> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields
        .get(1)?
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => range.parse().ok().map(|slot| (slot, slot)),
        })
        .collect();
    Some(Node {
        port,
        master: flags.contains("master"),
        failed: flags.contains("fail"),
        slots,
    })
}

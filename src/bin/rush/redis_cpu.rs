//! What Redis says it spent: CPU seconds and its commands' own time, read from
//! `INFO`, for the modes that report Redis' cost per request or per sale.

use boxoffice::gate::memory::info_field;
use redis::aio::MultiplexedConnection;

/// Redis' counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct RedisCpu {
    /// CPU seconds, user + system.
    pub cpu_s: f64,
    /// Seconds its commands took by its own count (`INFO commandstats`: the commands
    /// alone, without reading requests and writing replies).
    pub commands_s: f64,
}

impl RedisCpu {
    pub async fn read(conn: &mut MultiplexedConnection) -> Result<Self, String> {
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(conn)
            .await
            .map_err(|e| format!("INFO: {e}"))?;
        let field = |name: &str| -> Result<f64, String> {
            info_field(&info, name)
                .and_then(|v| v.parse().ok())
                .ok_or(format!("no {name} in INFO"))
        };
        let commands: f64 = info
            .lines()
            .filter(|l| l.starts_with("cmdstat_"))
            .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
        Ok(Self {
            cpu_s: field("used_cpu_user")? + field("used_cpu_sys")?,
            commands_s: commands / 1e6,
        })
    }

    /// Microseconds of CPU and of commands per unit of work since `before`.
    pub fn per(&self, before: &Self, units: u64) -> (f64, f64) {
        let units = units.max(1) as f64;
        (
            (self.cpu_s - before.cpu_s) * 1e6 / units,
            (self.commands_s - before.commands_s) * 1e6 / units,
        )
    }
}

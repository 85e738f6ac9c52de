//! `ublk-crypt status --json` as the test tools read it: the pool's figures, the daemon's
//! memory and the IO errors, parsed with serde (the daemon's own `Status` lives in a binary
//! crate; these fields are the part of it the torture and the demo report).

use serde_json::Value;

/// The pool's figures, the daemon's memory and its IO errors from one status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusSummary {
    pub chunks_total: u64,
    pub chunk_bytes: u64,
    pub high_water: u64,
    pub waits: u64,
    pub reserve_hits: u64,
    pub locked: bool,
    pub vm_lck_kib: u64,
    pub vm_rss_kib: u64,
    /// Summed over the queues.
    pub errors: u64,
}

impl StatusSummary {
    /// `None` when `json` is not a status (an error message, a cut line).
    pub fn parse(json: &str) -> Option<StatusSummary> {
        let v: Value = serde_json::from_str(json.trim()).ok()?;
        let pool = v.get("pool")?;
        let n = |o: &Value, k: &str| o.get(k).and_then(Value::as_u64);
        let errors = v
            .get("queues")?
            .as_array()?
            .iter()
            .map(|q| n(q, "errors").unwrap_or(0))
            .sum();
        Some(StatusSummary {
            chunks_total: n(pool, "chunks_total")?,
            chunk_bytes: n(pool, "chunk_bytes")?,
            high_water: n(pool, "high_water")?,
            waits: n(pool, "waits")?,
            reserve_hits: n(pool, "reserve_hits")?,
            locked: pool.get("locked").and_then(Value::as_bool)?,
            vm_lck_kib: n(&v, "vm_lck_kib")?,
            vm_rss_kib: n(&v, "vm_rss_kib")?,
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_is_parsed() {
        let s = r#"{"device":{"id":0,"pid":5},"path":"/dev/ublkb0","pool":{"chunk_bytes":65536,"chunks_total":256,"in_use":0,"high_water":17,"waits":3,"reserve_hits":1,"locked":true},"queues":[{"queue":0,"reads":1,"errors":2,"pool_high_water":9,"pool_waits":3},{"queue":1,"errors":1}],"vm_rss_kib":22000,"vm_lck_kib":21900}"#;
        let p = StatusSummary::parse(s).unwrap();
        assert_eq!((p.high_water, p.waits, p.reserve_hits), (17, 3, 1));
        assert_eq!((p.vm_lck_kib, p.chunks_total, p.errors), (21900, 256, 3));
        assert!(p.locked);
        assert_eq!(StatusSummary::parse("ublk-crypt: no such device"), None);
    }
}

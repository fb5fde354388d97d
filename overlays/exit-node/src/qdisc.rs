//! Priority classes for the flows the kernel carries: an htb qdisc on the
//! uplink (the kernel here has no `prio` or `mqprio`), one class per
//! client class, strict priority above a small guarantee each. The fast
//! path sets each packet's priority to its class (`1:(class + 1)`); what
//! has no priority of this qdisc (the exit's user-space path, the host's
//! own traffic) is served as class 0.

use std::process::Command;

/// A rate as `tc` writes it: `500kbit`, `20mbit`, `1gbit` (or plain bits
/// per second); the bits per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim().to_ascii_lowercase();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a rate such as 100mbit or 1gbit"))?;
    let scale = match unit {
        "" | "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        _ => return Err(format!("{text:?}: the unit must be bit, kbit, mbit or gbit")),
    };
    match value.checked_mul(scale) {
        Some(rate) if rate >= 8_000 => Ok(rate),
        _ => Err(format!("{text:?}: at least 8kbit, at most what a u64 holds")),
    }
}

/// The `tc` commands that set the qdisc up: `classes` classes under a
/// parent of `rate`; each class is guaranteed 1% of it (so no class starves
/// for good) and borrows the rest in class order.
pub fn commands(uplink: &str, rate: u64, classes: usize) -> Vec<Vec<String>> {
    let classes = classes.clamp(1, 8);
    let guarantee = (rate / 100).max(8_000);
    let mut out = vec![
        vec![
            "qdisc", "replace", "dev", uplink, "root", "handle", "1:", "htb", "default", "1",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>(),
        vec![
            "class".into(),
            "replace".into(),
            "dev".into(),
            uplink.into(),
            "parent".into(),
            "1:".into(),
            "classid".into(),
            "1:ff00".into(),
            "htb".into(),
            "rate".into(),
            format!("{rate}bit"),
            "ceil".into(),
            format!("{rate}bit"),
        ],
    ];
    for class in 0..classes {
        out.push(vec![
            "class".into(),
            "replace".into(),
            "dev".into(),
            uplink.into(),
            "parent".into(),
            "1:ff00".into(),
            "classid".into(),
            format!("1:{:x}", class + 1),
            "htb".into(),
            "rate".into(),
            format!("{guarantee}bit"),
            "ceil".into(),
            format!("{rate}bit"),
            "prio".into(),
            class.to_string(),
        ]);
    }
    out
}

/// Sets the qdisc up on `uplink`.
pub fn install(uplink: &str, rate: u64, classes: usize) -> Result<(), String> {
    for args in commands(uplink, rate, classes) {
        let output = Command::new("tc")
            .args(&args)
            .output()
            .map_err(|e| format!("running tc (iproute2): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "tc {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Removes the qdisc when dropped (the uplink's default qdisc comes back).
pub struct Shaper {
    uplink: String,
}

impl Shaper {
    pub fn new(uplink: &str) -> Shaper {
        Shaper {
            uplink: uplink.to_string(),
        }
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", &self.uplink, "root", "handle", "1:", "htb"])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_as_tc_writes_them() {
        assert_eq!(parse_rate("20mbit"), Ok(20_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(parse_rate("20mb").is_err(), "bytes are not bits");
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1bit").is_err(), "too slow to serve a class");
    }

    #[test]
    fn each_class_borrows_in_its_order_above_a_guarantee() {
        let commands = commands("eth0", 100_000_000, 3);
        assert_eq!(commands.len(), 2 + 3);
        assert_eq!(
            commands[0].join(" "),
            "qdisc replace dev eth0 root handle 1: htb default 1"
        );
        assert_eq!(
            commands[4].join(" "),
            "class replace dev eth0 parent 1:ff00 classid 1:3 htb rate 1000000bit ceil 100000000bit prio 2"
        );
    }
}

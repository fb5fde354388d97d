//! Resolvers that answer applications without port 53. The DNS hooks see
//! every query to port 53 of the processes in `dns.cgroup`, to whatever
//! server, a local stub's included. But glibc can also ask a resolver
//! daemon over a socket of its own: systemd-resolved through nsswitch's
//! `resolve` (varlink), nscd through its cache socket. Such a daemon
//! running outside `dns.cgroup` resolves with its own queries, which the
//! hooks never see, and would hand the cgroup's processes the real address
//! of a claimed name: their flows would leave by the plain path. Where that
//! is the setup, name rules are refused (at start and at `rule add`) with
//! what to change; inside the cgroup, such a daemon's own queries are
//! taken, and it hands out what the daemon answered.

/// A resolver daemon running on this host (in this network namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolver {
    /// Its process name (`systemd-resolve`, `nscd`).
    pub comm: String,
    pub pid: u32,
    /// Its cgroup v2 path, from the hierarchy's root (`/system.slice/...`).
    pub cgroup: String,
}

/// The services on nsswitch.conf's `hosts:` line, in order.
pub fn hosts_services(nsswitch: &str) -> Vec<String> {
    let Some(line) = nsswitch.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        line.strip_prefix("hosts:")
    }) else {
        return Vec::new();
    };
    line.split_whitespace()
        .filter(|word| !word.starts_with('['))
        .map(str::to_string)
        .collect()
}

/// Whether the cgroup `path` lies in `scope` (both from the root).
pub fn covers(scope: &str, path: &str) -> bool {
    let parts = |p: &str| {
        p.split('/')
            .filter(|part| !part.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (scope, path) = (parts(scope), parts(path));
    path.starts_with(&scope)
}

/// What keeps name rules from being kept here, one sentence each; empty
/// when nothing does. `scope` is `dns.cgroup` from the hierarchy's root.
pub fn uncovered(nsswitch: &str, scope: &str, scope_shown: &str, running: &[Resolver]) -> Vec<String> {
    let services = hosts_services(nsswitch);
    let mut found = Vec::new();
    for resolver in running {
        let (service, via) = match resolver.comm.as_str() {
            "systemd-resolve" => (
                "resolve",
                "through nsswitch (`resolve` on the hosts line of /etc/nsswitch.conf)",
            ),
            "nscd" => ("", "through its cache (nscd)"),
            _ => continue,
        };
        if !service.is_empty() && !services.iter().any(|s| s == service) {
            continue;
        }
        if covers(scope, &resolver.cgroup) {
            continue;
        }
        let fix = match resolver.comm.as_str() {
            "systemd-resolve" => {
                "or take `resolve` off the hosts line of /etc/nsswitch.conf (its stub on 127.0.0.53 is covered)"
            }
            _ => "or stop nscd's hosts cache (`enable-cache hosts no` in /etc/nscd.conf)",
        };
        found.push(format!(
            "{} (pid {}, cgroup {}) answers applications {via}, not on port 53, and runs outside \
             dns.cgroup ({scope_shown}): processes there would get the real addresses of claimed names. \
             Set dns.cgroup to a cgroup that holds it too (the default, the hierarchy's root), {fix}",
            resolver.comm, resolver.pid, resolver.cgroup
        ));
    }
    found
}

/// The resolver daemons running in this network namespace (Linux: from
/// /proc), with their cgroups.
#[cfg(target_os = "linux")]
pub fn running_resolvers() -> Vec<Resolver> {
    use std::os::unix::fs::MetadataExt;
    let netns = |pid: &str| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|m| m.ino())
    };
    let own = netns("self");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid = entry.ok()?.file_name().to_str()?.to_string();
            let number: u32 = pid.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            if comm != "systemd-resolve" && comm != "nscd" {
                return None;
            }
            let theirs = netns(&pid);
            if theirs.is_none() {
                // Without CAP_SYS_PTRACE the kernel hides another
                // process's namespaces: say so rather than pass it by.
                tracing::warn!(
                    pid = number,
                    comm,
                    "cannot tell whether this resolver daemon shares Oasis' network namespace \
                     (/proc/PID/ns/net unreadable: the daemon needs CAP_SYS_PTRACE); if it does and runs \
                     outside the redirected cgroup, claimed names may leak through it"
                );
            }
            if theirs != own {
                return None;
            }
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            let cgroup = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
            Some(Resolver {
                comm: comm.to_string(),
                pid: number,
                cgroup,
            })
        })
        .collect()
}

#[cfg(not(target_os = "linux"))]
pub fn running_resolvers() -> Vec<Resolver> {
    Vec::new()
}

/// A cgroup's path from the root of the cgroup v2 hierarchy it lies in,
/// for a path where that hierarchy is mounted (`/sys/fs/cgroup/a/b` →
/// `/a/b`).
pub fn cgroup_of(path: &std::path::Path, mountinfo: &str) -> Option<String> {
    let mount = mountinfo
        .lines()
        .filter(|line| line.contains(" - cgroup2 "))
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| path.starts_with(point))
        .max_by_key(|point| point.len())?;
    let rest = path.strip_prefix(mount).ok()?;
    Some(format!("/{}", rest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(cgroup: &str) -> Resolver {
        Resolver {
            comm: "systemd-resolve".into(),
            pid: 311,
            cgroup: cgroup.into(),
        }
    }

    #[test]
    fn a_resolver_daemon_outside_the_cgroup_is_named_with_what_to_change() {
        let nsswitch =
            "passwd: files\nhosts:          files mymachines resolve [!UNAVAIL=return] dns myhostname\n";
        assert_eq!(
            hosts_services(nsswitch),
            ["files", "mymachines", "resolve", "dns", "myhostname"]
        );
        let service = resolved("/system.slice/systemd-resolved.service");
        // The default scope, the root, holds it.
        assert!(uncovered(nsswitch, "/", "/sys/fs/cgroup", std::slice::from_ref(&service)).is_empty());
        let found = uncovered(
            nsswitch,
            "/user.slice",
            "/sys/fs/cgroup/user.slice",
            std::slice::from_ref(&service),
        );
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("systemd-resolve (pid 311"), "{}", found[0]);
        assert!(
            found[0].contains("take `resolve` off the hosts line"),
            "{}",
            found[0]
        );
        // Without `resolve` on the hosts line, it answers on port 53 only.
        assert!(uncovered("hosts: files dns\n", "/user.slice", "x", &[service]).is_empty());
        // nscd answers through its cache whatever nsswitch says.
        let nscd = Resolver {
            comm: "nscd".into(),
            pid: 9,
            cgroup: "/system.slice/nscd.service".into(),
        };
        assert_eq!(
            uncovered(
                "hosts: files dns\n",
                "/user.slice",
                "x",
                std::slice::from_ref(&nscd)
            )
            .len(),
            1
        );
        assert!(uncovered("hosts: files dns\n", "/system.slice", "x", &[nscd]).is_empty());
    }

    #[test]
    fn cgroups_lie_in_scopes_by_whole_components() {
        assert!(covers("/", "/system.slice/x.service"));
        assert!(covers("/user.slice", "/user.slice/user-1000.slice"));
        assert!(covers("/user.slice", "/user.slice"));
        assert!(!covers("/user.slice", "/user.slicer"));
        assert!(!covers("/user.slice/a", "/user.slice"));
        let mountinfo = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n\
                         40 1 0:26 / /run/x/cgroup2 rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup_of(std::path::Path::new("/sys/fs/cgroup/user.slice"), mountinfo).as_deref(),
            Some("/user.slice")
        );
        assert_eq!(
            cgroup_of(std::path::Path::new("/run/x/cgroup2/t-1"), mountinfo).as_deref(),
            Some("/t-1")
        );
        assert_eq!(
            cgroup_of(std::path::Path::new("/sys/fs/cgroup"), mountinfo).as_deref(),
            Some("/")
        );
    }
}

//! Rule fields that name who sent a flow rather than where it goes: the
//! uid owning the sending socket, its cgroup (a systemd unit, slice or
//! desktop scope, with everything below it), and the name of the process
//! that connected it. The classifier reads them from the packet's socket
//! (oasis-ebpf/src/owner.rs); here they are parsed, shown, and matched as
//! the kernel matches them.

use std::fmt;
use std::path::{Path, PathBuf};

use oasis_common::{APP_NAME_LEN, AppName, MAX_CGROUP_LEVEL};

/// Which sending socket a rule asks for. A field left out matches any
/// socket, and a packet with no local socket (forwarded traffic) only
/// when every field is left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SenderMatch {
    pub uid: Option<u32>,
    pub cgroup: Option<CgroupPath>,
    pub app: Option<App>,
}

impl SenderMatch {
    pub fn is_any(&self) -> bool {
        self.uid.is_none() && self.cgroup.is_none() && self.app.is_none()
    }

    /// Whether a packet sent from `sender` meets every field given; `None`:
    /// the packet has no local socket. `cgroup_id` tells which id the
    /// rule's cgroup has now (`None`: it does not exist).
    pub fn matches(&self, sender: Option<&Sender>, cgroup_id: impl Fn(&CgroupPath) -> Option<u64>) -> bool {
        if self.is_any() {
            return true;
        }
        let Some(sender) = sender else {
            return false;
        };
        if let Some(uid) = self.uid
            && sender.uid != uid
        {
            return false;
        }
        if let Some(cgroup) = &self.cgroup {
            let level = cgroup.level() as usize;
            match cgroup_id(cgroup) {
                Some(id) if sender.cgroups.get(level) == Some(&id) => {}
                _ => return false,
            }
        }
        if let Some(app) = &self.app
            && sender.app != Some(app.key())
        {
            return false;
        }
        true
    }
}

impl SenderMatch {
    /// Whether the process that asked a DNS query meets every field
    /// given; a cgroup by its path (the asker's cgroup or one below it).
    pub fn matches_asker(&self, asker: &Asker) -> bool {
        if let Some(uid) = self.uid
            && asker.uid != uid
        {
            return false;
        }
        if let Some(cgroup) = &self.cgroup {
            let Some(path) = &asker.cgroup else {
                return false;
            };
            let path = path.trim_matches('/');
            let within = path
                .strip_prefix(cgroup.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if !within {
                return false;
            }
        }
        if let Some(app) = &self.app
            && asker.app != app.key()
        {
            return false;
        }
        true
    }
}

/// The process that asked a DNS query, as the socket hooks saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Asker {
    pub uid: u32,
    /// Its cgroup v2 path below the root; None when it is gone.
    pub cgroup: Option<String>,
    pub app: AppName,
}

/// A process's cgroup v2 path, from its /proc/PID/cgroup text.
pub fn cgroup_of(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim().trim_start_matches('/').to_string())
}

impl fmt::Display for SenderMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(uid) = self.uid {
            parts.push(format!("uid {uid}"));
        }
        if let Some(cgroup) = &self.cgroup {
            parts.push(format!("cgroup {cgroup}"));
        }
        if let Some(app) = &self.app {
            parts.push(format!("app {app}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// What the kernel knows of a packet's socket, for the reference matcher
/// and the tests: its owner, the ids of its cgroup and every ancestor by
/// level (index 0 the root), the process name its hooks recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sender {
    pub uid: u32,
    pub cgroups: Vec<u64>,
    pub app: Option<AppName>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SenderError {
    #[error("no user named {0:?} in /etc/passwd: give a user name or a numeric uid")]
    NoSuchUser(String),
    #[error("bad uid {0:?}: give a user name or a number below 4294967295")]
    BadUid(String),
    #[error(
        "bad cgroup {given:?}: {why}; give a path below the cgroup v2 root such as \
         system.slice/backup.service or user.slice/user-1000.slice"
    )]
    BadCgroup { given: String, why: &'static str },
    #[error(
        "bad application name {0:?}: give the executable's file name (firefox) or its path \
         (/usr/lib/firefox/firefox)"
    )]
    BadApp(String),
}

/// A user: a number, or a name looked up in `passwd` (the text of
/// /etc/passwd).
pub fn parse_uid(text: &str, passwd: &str) -> Result<u32, SenderError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u32>()
            .ok()
            .filter(|&uid| uid != u32::MAX)
            .ok_or_else(|| SenderError::BadUid(text.to_string()));
    }
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            Some((fields.next()?, fields.nth(1)?))
        })
        .find(|(name, _)| *name == text)
        .and_then(|(_, uid)| uid.parse().ok())
        .ok_or_else(|| SenderError::NoSuchUser(text.to_string()))
}

/// A cgroup by its path below the cgroup v2 root, without the mount point:
/// `user.slice/user-1000.slice`. Its level is its number of components.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// Accepts `a/b`, `/a/b`, and `/sys/fs/cgroup/a/b` (the usual mount point).
    pub fn parse(text: &str) -> Result<CgroupPath, SenderError> {
        let bad = |why| SenderError::BadCgroup {
            given: text.to_string(),
            why,
        };
        let trimmed = text.trim();
        let relative = trimmed
            .strip_prefix("/sys/fs/cgroup")
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .unwrap_or(trimmed)
            .trim_matches('/');
        if relative.is_empty() {
            return Err(bad(
                "the root cgroup holds every socket; leave the field out instead",
            ));
        }
        if relative.len() > 4096 {
            return Err(bad("longer than 4096 bytes"));
        }
        let mut level = 0;
        for part in relative.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(bad("empty, '.' and '..' components are not allowed"));
            }
            if part.len() > 255 || part.contains('\0') {
                return Err(bad("a component is longer than 255 bytes or holds a NUL"));
            }
            level += 1;
        }
        if level > MAX_CGROUP_LEVEL {
            return Err(bad("deeper than 63 levels"));
        }
        Ok(CgroupPath(relative.to_string()))
    }

    /// Its depth below the root (`user.slice` is 1): the ancestor level
    /// the kernel compares at.
    pub fn level(&self) -> u32 {
        self.0.split('/').count() as u32
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its id now: the inode number of its directory on a cgroup v2
    /// mount, which is what the kernel calls its id. `None` while it
    /// does not exist (a unit not started yet).
    #[cfg(unix)]
    pub fn id_below(&self, root: &Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(root.join(&self.0))
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| m.ino())
    }

    /// No cgroups but on Linux.
    #[cfg(not(unix))]
    pub fn id_below(&self, _root: &Path) -> Option<u64> {
        None
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the cgroup v2 hierarchy is mounted, from a mountinfo text
/// (/proc/self/mountinfo): the first mount of its root.
pub fn cgroup_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        // Only the hierarchy's root: a mount of a subtree (root field
        // other than "/") would give other paths other meanings.
        let mut fields = mount.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fs.split(' ').next() == Some("cgroup2") && root == "/").then(|| PathBuf::from(point))
    })
}

/// The id each cgroup the rules name has now (the ones that exist).
pub fn cgroup_ids(
    rules: &[crate::rules::Rule],
    id_of: impl Fn(&CgroupPath) -> Option<u64>,
) -> crate::compile::CgroupIds {
    rules
        .iter()
        .filter_map(|rule| rule.subset.sender.cgroup.as_ref())
        .filter_map(|path| Some((path.clone(), id_of(path)?)))
        .collect()
}

/// A cgroup's id on this host, below the cgroup v2 hierarchy's mount
/// point (found once). `None` where there are no cgroups.
pub fn host_cgroup_id(path: &CgroupPath) -> Option<u64> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| cgroup_root(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()))
        .as_ref()
        .and_then(|root| path.id_below(root))
}

/// An application by the name the kernel keeps for its processes: the
/// executable's file name, cut to 15 bytes (`comm`). A path is taken for
/// its file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct App {
    given: String,
}

impl App {
    pub fn parse(text: &str) -> Result<App, SenderError> {
        let text = text.trim();
        let name = text.rsplit('/').next().unwrap_or(text);
        if name.is_empty() || name.len() > 4096 || name.contains('\0') {
            return Err(SenderError::BadApp(text.to_string()));
        }
        Ok(App {
            given: text.to_string(),
        })
    }

    /// The name the kernel compares: the file name, cut as the kernel cuts
    /// it (at a character boundary it may not respect, so bytes).
    pub fn key(&self) -> AppName {
        let name = self.given.rsplit('/').next().unwrap_or(&self.given).as_bytes();
        let mut bytes = [0u8; APP_NAME_LEN];
        let len = name.len().min(APP_NAME_LEN - 1);
        bytes[..len].copy_from_slice(&name[..len]);
        AppName { bytes }
    }

    pub fn as_str(&self) -> &str {
        &self.given
    }
}

impl fmt::Display for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.given)
    }
}

/// A process name as the kernel stored it, for display.
pub fn app_text(name: &AppName) -> String {
    let end = name.bytes.iter().position(|&b| b == 0).unwrap_or(APP_NAME_LEN);
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";

    #[test]
    fn users_by_name_or_number() {
        assert_eq!(parse_uid("alice", PASSWD), Ok(1000));
        assert_eq!(parse_uid("1234", PASSWD), Ok(1234));
        assert_eq!(parse_uid("0", PASSWD), Ok(0));
        assert_eq!(
            parse_uid("bob", PASSWD),
            Err(SenderError::NoSuchUser("bob".into()))
        );
        assert!(matches!(
            parse_uid("4294967295", PASSWD),
            Err(SenderError::BadUid(_))
        ));
        assert!(matches!(
            parse_uid("99999999999", PASSWD),
            Err(SenderError::BadUid(_))
        ));
    }

    #[test]
    fn cgroup_paths_are_normalised_and_checked() {
        for given in [
            "user.slice/user-1000.slice",
            "/user.slice/user-1000.slice/",
            "/sys/fs/cgroup/user.slice/user-1000.slice",
        ] {
            let path = CgroupPath::parse(given).unwrap();
            assert_eq!(path.as_str(), "user.slice/user-1000.slice");
            assert_eq!(path.level(), 2);
        }
        for bad in ["", "/", "/sys/fs/cgroup", "a//b", "a/../b", "./a"] {
            assert!(CgroupPath::parse(bad).is_err(), "{bad:?}");
        }
        // A directory merely named like the mount point is not stripped.
        assert_eq!(
            CgroupPath::parse("/sys/fs/cgroupx/a").unwrap().as_str(),
            "sys/fs/cgroupx/a"
        );
        let deep = vec!["a"; 64].join("/");
        assert!(CgroupPath::parse(&deep).is_err());
    }

    #[test]
    fn the_hierarchy_root_is_found_in_mountinfo() {
        // A hybrid layout, and a mount of a subtree (whose paths mean
        // something else) listed first.
        let info = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 1 0:24 /sub /srv/sub rw - cgroup2 cgroup2 rw
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(cgroup_root(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            cgroup_root("27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn applications_are_compared_as_the_kernel_keeps_their_name() {
        let app = App::parse("/usr/lib/firefox/firefox").unwrap();
        assert_eq!(app_text(&app.key()), "firefox");
        assert_eq!(app.to_string(), "/usr/lib/firefox/firefox");
        let long = App::parse("chromium-browser-stable").unwrap();
        assert_eq!(app_text(&long.key()), "chromium-browse");
        assert!(App::parse("").is_err());
        assert!(App::parse("/usr/bin/").is_err());
    }

    #[test]
    fn askers_match_by_cgroup_path_uid_and_name() {
        let rule = SenderMatch {
            cgroup: Some(CgroupPath::parse("user.slice/app-firefox.scope").unwrap()),
            ..SenderMatch::default()
        };
        let asker = |path: &str| Asker {
            uid: 1000,
            cgroup: cgroup_of(&format!("12:pids:/x\n0::{path}\n")),
            app: App::parse("dig").unwrap().key(),
        };
        assert!(rule.matches_asker(&asker("/user.slice/app-firefox.scope")));
        assert!(rule.matches_asker(&asker("/user.slice/app-firefox.scope/sub")));
        assert!(!rule.matches_asker(&asker("/user.slice/app-firefox.scopex")));
        assert!(!rule.matches_asker(&asker("/user.slice")));
        assert!(!rule.matches_asker(&Asker {
            cgroup: None,
            ..asker("/")
        }));
        let by_app = SenderMatch {
            uid: Some(1000),
            app: Some(App::parse("/usr/bin/dig").unwrap()),
            ..SenderMatch::default()
        };
        assert!(by_app.matches_asker(&asker("/")));
        assert!(!by_app.matches_asker(&Asker { uid: 0, ..asker("/") }));
    }

    #[test]
    fn every_given_field_must_match_and_forwarded_traffic_has_no_sender() {
        let rule = SenderMatch {
            uid: Some(1000),
            cgroup: Some(CgroupPath::parse("user.slice").unwrap()),
            app: Some(App::parse("curl").unwrap()),
        };
        let ids = |_: &CgroupPath| Some(77);
        let sender = Sender {
            uid: 1000,
            cgroups: vec![1, 77, 78],
            app: Some(App::parse("curl").unwrap().key()),
        };
        assert!(rule.matches(Some(&sender), ids));
        assert!(!rule.matches(None, ids));
        assert!(!rule.matches(
            Some(&Sender {
                uid: 0,
                ..sender.clone()
            }),
            ids
        ));
        assert!(!rule.matches(
            Some(&Sender {
                app: None,
                ..sender.clone()
            }),
            ids
        ));
        assert!(!rule.matches(Some(&sender), |_| None));
        assert!(!rule.matches(
            Some(&Sender {
                cgroups: vec![1, 70, 77],
                ..sender.clone()
            }),
            ids
        ));
        assert!(SenderMatch::default().matches(None, ids));
    }
}

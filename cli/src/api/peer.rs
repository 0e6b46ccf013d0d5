//! Who may use the control socket: root, the agent's own user, and members of group `dso`.
//!
//! The socket file is 0660 and owned by group `dso` when it exists, but file permissions
//! alone are not enough (a process may have been handed an open socket), so every
//! connection is checked with SO_PEERCRED. Supplementary groups are not part of
//! SO_PEERCRED; they are read from `/proc/<pid>/status`.

use std::fs;

use tokio::net::unix::UCred;

/// Name of the group whose members may use the control socket.
pub const GROUP: &str = "dso";

/// The rule the agent applies to every peer.
#[derive(Debug, Clone)]
pub struct Access {
    /// The agent's own uid.
    pub own_uid: u32,
    /// gid of group `dso`, when that group exists.
    pub group: Option<u32>,
}

/// The verdict on one peer, with the reason for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, and why.
    Allow(&'static str),
    /// Refused.
    Deny,
}

impl Access {
    /// The rule for this process, reading its uid and group `dso` from the system.
    pub fn for_this_process() -> Access {
        Access {
            own_uid: own_uid().unwrap_or(0),
            group: group_id(GROUP),
        }
    }

    /// Checks a peer.
    pub fn check(&self, cred: &UCred) -> Verdict {
        let groups = || {
            cred.pid()
                .and_then(|pid| u32::try_from(pid).ok())
                .and_then(proc_groups)
                .unwrap_or_default()
        };
        self.check_ids(cred.uid(), cred.gid(), groups)
    }

    /// Checks a peer by uid, primary gid and (read only when needed) supplementary groups.
    pub fn check_ids(&self, uid: u32, gid: u32, groups: impl FnOnce() -> Vec<u32>) -> Verdict {
        if uid == 0 {
            return Verdict::Allow("root");
        }
        if uid == self.own_uid {
            return Verdict::Allow("same user as the agent");
        }
        let Some(dso) = self.group else {
            return Verdict::Deny;
        };
        if gid == dso {
            return Verdict::Allow("primary group dso");
        }
        if groups().contains(&dso) {
            Verdict::Allow("member of group dso")
        } else {
            Verdict::Deny
        }
    }
}

/// The effective uid of this process (the one files are created and checked with, and the
/// one `SO_PEERCRED` reports of peers), from `/proc/self/status` (no unsafe `geteuid` call
/// needed): the second of the `Uid:` line's real, effective, saved and filesystem ids.
pub fn own_uid() -> Option<u32> {
    status_field(&fs::read_to_string("/proc/self/status").ok()?, "Uid:")?
        .get(1)
        .copied()
}

/// The gid of group `name` from `/etc/group`.
pub fn group_id(name: &str) -> Option<u32> {
    parse_group_file(&fs::read_to_string("/etc/group").ok()?, name)
}

fn parse_group_file(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn proc_groups(pid: u32) -> Option<Vec<u32>> {
    status_field(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "Groups:",
    )
}

fn status_field(status: &str, field: &str) -> Option<Vec<u32>> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(
        line[field.len()..]
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_group_file_and_status() {
        let groups = "root:x:0:\ndocker:x:998:alice\ndso:x:997:alice,bob\n";
        assert_eq!(parse_group_file(groups, "dso"), Some(997));
        assert_eq!(parse_group_file(groups, "nope"), None);
        let status = "Name:\tdso\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 997 \n";
        assert_eq!(status_field(status, "Uid:"), Some(vec![1000, 1000, 1000, 1000]));
        assert_eq!(status_field(status, "Groups:"), Some(vec![4, 24, 997]));
    }

    #[test]
    fn allows_root_owner_and_group_members_only() {
        let access = Access {
            own_uid: 1000,
            group: Some(997),
        };
        assert_eq!(access.check_ids(0, 0, Vec::new), Verdict::Allow("root"));
        assert_eq!(
            access.check_ids(1000, 1000, Vec::new),
            Verdict::Allow("same user as the agent")
        );
        assert_eq!(
            access.check_ids(1001, 997, Vec::new),
            Verdict::Allow("primary group dso")
        );
        assert_eq!(
            access.check_ids(1001, 1001, || vec![4, 997]),
            Verdict::Allow("member of group dso")
        );
        assert_eq!(access.check_ids(1001, 1001, || vec![4]), Verdict::Deny);
        let no_group = Access {
            own_uid: 1000,
            group: None,
        };
        assert_eq!(no_group.check_ids(1001, 997, || vec![997]), Verdict::Deny);
    }

    #[test]
    fn own_uid_is_readable() {
        assert!(own_uid().is_some());
    }
}

//! Rules by the sending socket: its owner's uid, its cgroup (or any
//! ancestor), the name of the process that connected it. Read at TC
//! egress from the packet's socket, so only this host's own traffic has
//! an owner: a forwarded packet (a router's clients, a container with its
//! own network namespace) has no local socket, and a rule naming any of
//! these fields never matches it.
//!
//! The process is not known at TC egress (a TCP retransmission runs in
//! whatever context the timer fires), so the socket hooks record its name
//! by socket cookie when it connects or sends (`remember_app`).

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_comm,
        generated::{
            bpf_get_socket_cookie, bpf_get_socket_uid, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        },
    },
    programs::{SockAddrContext, TcContext},
};
use oasis_common::{AppName, CGROUP_DEPTHS, OwnerMatch, RULE_WORDS, RuleSet, owner};

use crate::maps::{
    CGROUP_MEMO, OWNER, RULE_APP, RULE_CGROUP, RULE_MEMO_SLOT, RULE_SCRATCH, RULE_UID, SOCKET_APP,
};

/// Keeps, of `set`, the rules whose socket fields the packet's socket
/// meets. Costs nothing beyond one array lookup while no rule names one.
#[inline(never)]
pub(crate) fn restrict(ctx: &TcContext, set: &mut RuleSet) {
    let Some(owner) = OWNER.get(0) else {
        return;
    };
    if owner.fields == 0 {
        return;
    }
    restrict_by_socket(ctx, set, owner);
}

#[inline(always)]
fn restrict_by_socket(ctx: &TcContext, set: &mut RuleSet, owner: &OwnerMatch) {
    let skb = ctx.skb.skb;
    // SAFETY: helpers on the program's own context. 0: the packet has no
    // full local socket (forwarded, or a TCP time-wait's answer).
    let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
    if cgroup == 0 {
        keep_all(set, owner, &owner.any_uid, &owner.any_cgroup, &owner.any_app);
        return;
    }
    // A field is looked up only when a rule the headers admitted names it.
    let mut by_uid = &owner.any_uid;
    if owner.fields & owner::UID != 0 && names_some(set, &owner.any_uid) {
        // SAFETY: as above.
        let uid = unsafe { bpf_get_socket_uid(skb) };
        // SAFETY: plain integers.
        if let Some(named) = unsafe { RULE_UID.get(&uid) } {
            by_uid = named;
        }
    }
    let mut by_cgroup = &owner.any_cgroup;
    if owner.fields & owner::CGROUP != 0
        && names_some(set, &owner.any_cgroup)
        && let Some(allowed) = RULE_SCRATCH.get_ptr_mut(1)
    {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        let allowed = unsafe { &mut *allowed };
        cgroup_rules(skb, cgroup, owner, allowed);
        by_cgroup = allowed;
    }
    let mut by_app = &owner.any_app;
    if owner.fields & owner::APP != 0 && names_some(set, &owner.any_app) {
        // SAFETY: as above.
        let cookie = unsafe { bpf_get_socket_cookie(skb as *mut _) };
        // SAFETY: plain bytes.
        if let Some(named) = unsafe { SOCKET_APP.get(&cookie) }.and_then(|app| unsafe { RULE_APP.get(app) }) {
            by_app = named;
        }
    }
    keep_all(set, owner, by_uid, by_cgroup, by_app);
}

/// Whether `set` holds a rule outside `any`: one naming the field.
#[inline(never)]
fn names_some(set: &RuleSet, any: &RuleSet) -> bool {
    let mut named = 0;
    let mut i = 0;
    while i < RULE_WORDS {
        named |= set.words[i] & !any.words[i];
        i += 1;
    }
    named != 0
}

/// The rules the socket's cgroup admits: those naming no cgroup, and
/// those naming one of its ancestors (or itself) at a level some rule uses.
/// Remembered per cgroup: a cgroup's next flows cost one lookup.
#[inline(never)]
fn cgroup_rules(skb: *mut __sk_buff, cgroup: u64, owner: &OwnerMatch, allowed: &mut RuleSet) {
    // SAFETY: plain integers.
    if let Some(known) = unsafe { CGROUP_MEMO.get(&cgroup) }
        && known.generation == owner.generation
    {
        let mut i = 0;
        while i < RULE_WORDS {
            allowed.words[i] = known.rules.words[i];
            i += 1;
        }
        return;
    }
    walk_ancestors(skb, owner, allowed);
    remember_cgroup(cgroup, owner.generation, allowed);
}

#[inline(never)]
fn walk_ancestors(skb: *mut __sk_buff, owner: &OwnerMatch, allowed: &mut RuleSet) {
    let mut i = 0;
    while i < RULE_WORDS {
        allowed.words[i] = owner.any_cgroup.words[i];
        i += 1;
    }
    let mut i = 0;
    while i < CGROUP_DEPTHS {
        let level = owner.cgroup_levels[i];
        if level == 0 {
            break;
        }
        // SAFETY: a helper on the program's own packet; a level deeper
        // than the socket's cgroup gives 0, which no rule names.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, i32::from(level)) };
        // SAFETY: plain integers.
        if let Some(named) = unsafe { RULE_CGROUP.get(&id) } {
            allowed.union_with(named);
        }
        i += 1;
    }
}

/// Keeps a cgroup's rules for its sockets' next flows. A full map only
/// costs the walk again.
#[inline(never)]
fn remember_cgroup(cgroup: u64, generation: u64, rules: &RuleSet) {
    if let Some(memo) = RULE_MEMO_SLOT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        let memo = unsafe { &mut *memo };
        memo.generation = generation;
        let mut i = 0;
        while i < RULE_WORDS {
            memo.rules.words[i] = rules.words[i];
            i += 1;
        }
        let _ = CGROUP_MEMO.insert(&cgroup, memo, 0);
    }
}

/// `set ∩ (any_uid ∪ by_uid) ∩ by_cgroup ∩ (any_app ∪ by_app)`, in one
/// pass with no set copied. Apart: inlined, the compiler would hold the
/// sets' words on the stack, which all programs' calls share 512 bytes of.
#[inline(never)]
fn keep_all(set: &mut RuleSet, owner: &OwnerMatch, by_uid: &RuleSet, by_cgroup: &RuleSet, by_app: &RuleSet) {
    let mut i = 0;
    while i < RULE_WORDS {
        set.words[i] &= (owner.any_uid.words[i] | by_uid.words[i])
            & (owner.any_cgroup.words[i] | by_cgroup.words[i])
            & (owner.any_app.words[i] | by_app.words[i]);
        i += 1;
    }
}

/// Records the name of the process connecting or sending on this socket,
/// the first time, while some rule asks for one.
#[inline(always)]
pub(crate) fn remember_app(ctx: &SockAddrContext) {
    if OWNER.get(0).is_none_or(|owner| owner.fields & owner::APP == 0) {
        return;
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain bytes.
    if unsafe { SOCKET_APP.get(&cookie) }.is_some() {
        return;
    }
    let Ok(bytes) = bpf_get_current_comm() else {
        return;
    };
    let _ = SOCKET_APP.insert(&cookie, &AppName { bytes }, 0);
}

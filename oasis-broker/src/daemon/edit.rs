//! Editing the config file in place. The daemon owns three keys of it,
//! `next_rule_id`, `overlays` and `rules`; everything else is the user's,
//! kept byte for byte, comments and layout included. Within the lists, an
//! item that is still there keeps its text (and the comments above it):
//! a rule by its id (rules never change), an overlay by its name while it
//! reads back as what the daemon holds.
//!
//! Plain text in, plain text out: a YAML file is read as top-level keys
//! (a line starting in column 0) with the comment and blank lines just
//! above each, and a list as items starting with `-` at the list's
//! indentation. A value written in flow style (`rules: [...]`) is replaced
//! whole.

use std::collections::HashMap;

/// The keys the daemon writes.
pub const OWNED: [&str; 3] = ["next_rule_id", "overlays", "rules"];

/// A config file, cut where the daemon's keys are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skeleton {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    /// The user's text, kept as it is.
    Kept(String),
    /// One of the daemon's keys: the comments above it and its key line
    /// (`rules:`, or `rules:   # note`); its value is written anew, a
    /// list's items indented as the file had them.
    Owned {
        key: &'static str,
        head: String,
        indent: usize,
    },
}

/// The items of the daemon's lists as the file has them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Items {
    /// A rule's text by its id, with the comments above it.
    pub rules: HashMap<u32, String>,
    /// An overlay's text by its name, with the comments above it.
    pub overlays: HashMap<String, String>,
}

/// Reads `text` as a skeleton and the items of its lists. None when it
/// holds nothing but comments (a new file is written whole).
pub fn parse(text: &str) -> Option<(Skeleton, Items)> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| top_key(lines[i]).is_some())
        .collect();
    if starts.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    let mut items = Items::default();
    // Each key owns the comment and blank lines just above it.
    let lead = |start: usize, floor: usize| {
        let mut first = start;
        while first > floor && is_aside(lines[first - 1]) {
            first -= 1;
        }
        first
    };
    let mut at = 0;
    for (n, &start) in starts.iter().enumerate() {
        let first = lead(start, at);
        let end = starts
            .get(n + 1)
            .map_or(lines.len(), |&next| lead(next, start + 1));
        if first > at {
            parts.push(Part::Kept(lines[at..first].concat()));
        }
        let key = top_key(lines[start]).unwrap_or_default();
        match OWNED.iter().find(|k| **k == key) {
            None => parts.push(Part::Kept(lines[first..end].concat())),
            Some(&key) => {
                let head = format!("{}{}", lines[first..start].concat(), key_line(lines[start], key));
                let mut indent = 0;
                if key != "next_rule_id" && block_value(lines[start]) {
                    let (found, list) = list_items(&lines[start + 1..end]);
                    indent = found;
                    for (id, item) in list {
                        match key {
                            "rules" => {
                                if let Some(id) = rule_id(&item) {
                                    items.rules.insert(id, item);
                                }
                            }
                            _ => {
                                if let Some(name) = id.or_else(|| field(&item, "name")) {
                                    items.overlays.insert(name, item);
                                }
                            }
                        }
                    }
                }
                parts.push(Part::Owned { key, head, indent });
            }
        }
        at = end;
    }
    if at < lines.len() {
        parts.push(Part::Kept(lines[at..].concat()));
    }
    Some((Skeleton { parts }, items))
}

impl Skeleton {
    /// The file with the daemon's keys given these values: `next_rule_id`
    /// its number, `overlays` and `rules` their items' texts (each an item
    /// of a block list at column 0, `- ...`, ending in a newline). Keys the
    /// file lacks are added at its end.
    pub fn render<'a>(
        &self,
        next_rule_id: u32,
        overlays: &[&str],
        rules: impl Iterator<Item = &'a str>,
        out: &mut String,
    ) {
        let mut rules = Some(rules);
        let mut written = [false; 3];
        let mut value = |key: &str, indent: usize, out: &mut String| match key {
            "next_rule_id" => out.push_str(&format!(" {next_rule_id}\n")),
            "overlays" => list(overlays.iter().copied(), indent, out),
            _ => {
                if let Some(rules) = rules.take() {
                    list(rules, indent, out);
                } else {
                    out.push_str(" []\n");
                }
            }
        };
        for part in &self.parts {
            match part {
                Part::Kept(text) => out.push_str(text),
                Part::Owned { key, head, indent } => {
                    let index = OWNED.iter().position(|k| k == key).unwrap_or(0);
                    if written[index] {
                        // A key given twice: the first carries the value.
                        continue;
                    }
                    written[index] = true;
                    if !out.is_empty() && !out.ends_with('\n') {
                        out.push('\n');
                    }
                    out.push_str(head);
                    value(key, *indent, out);
                }
            }
        }
        for (index, key) in OWNED.iter().enumerate() {
            if !written[index] {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(key);
                out.push(':');
                value(key, 0, out);
            }
        }
    }
}

/// A list's items after its key (whose line ends without a newline
/// written yet), each line indented by `indent`: ` []` when there are
/// none.
fn list<'a>(items: impl Iterator<Item = &'a str>, indent: usize, out: &mut String) {
    let mut items = items.peekable();
    if items.peek().is_none() {
        out.push_str(" []\n");
        return;
    }
    out.push('\n');
    for item in items {
        if indent == 0 {
            out.push_str(item);
        } else {
            for line in item.split_inclusive('\n') {
                if line != "\n" {
                    out.extend(std::iter::repeat_n(' ', indent));
                }
                out.push_str(line);
            }
        }
        if !item.ends_with('\n') {
            out.push('\n');
        }
    }
}

/// A comment or blank line.
fn is_aside(line: &str) -> bool {
    let trimmed = line.trim_start();
    trimmed.is_empty() || trimmed.starts_with('#')
}

/// The key of a top-level mapping entry starting on this line.
fn top_key(line: &str) -> Option<&str> {
    let first = line.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '_') {
        return None;
    }
    let (key, rest) = line.split_once(':')?;
    let valid = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (valid && (rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r']))).then_some(key)
}

/// Whether the key's value is a block below its line (nothing after the
/// colon but a comment).
fn block_value(line: &str) -> bool {
    let rest = line.split_once(':').map_or("", |(_, rest)| rest);
    let rest = rest.trim();
    rest.is_empty() || rest.starts_with('#')
}

/// The key line as written anew: kept when the value was a block below
/// it (any comment after the colon stays), else just `key:`. No newline:
/// the value follows.
fn key_line(line: &str, key: &str) -> String {
    if key != "next_rule_id" && block_value(line) {
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        format!("{key}:")
    }
}

/// The indentation of a block list, and its items: each with the comment
/// and blank lines above it, and the name of an item written `- name: X`
/// on its first line.
fn list_items(lines: &[&str]) -> (usize, Vec<(Option<String>, String)>) {
    let Some(indent) = lines
        .iter()
        .find(|l| !is_aside(l))
        .filter(|l| l.trim_start().starts_with('-'))
        .map(|l| l.len() - l.trim_start().len())
    else {
        return (0, Vec::new());
    };
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let line = lines[i];
            line.len() - line.trim_start().len() == indent && line.trim_start().starts_with('-')
        })
        .collect();
    let mut items = Vec::with_capacity(starts.len());
    let mut at = 0;
    for (n, &start) in starts.iter().enumerate() {
        let end = match starts.get(n + 1) {
            Some(&next) => {
                let mut first = next;
                while first > start + 1 && is_aside(lines[first - 1]) {
                    first -= 1;
                }
                first
            }
            None => lines.len(),
        };
        // Items are written at column 0, as the daemon renders them: each
        // line loses the list's indentation, no more.
        let text: String = lines[at..end]
            .iter()
            .map(|l| {
                let spaces = l.len() - l.trim_start_matches(' ').len();
                &l[spaces.min(indent)..]
            })
            .collect();
        let first = lines[start].trim_start().trim_start_matches('-').trim_start();
        let name = first
            .strip_prefix("name:")
            .map(|v| unquote(v.split('#').next().unwrap_or("").trim()));
        items.push((name, text));
        at = end;
    }
    (indent, items)
}

/// A rule item's `id`: on a line of its own (`id: 7`, or `- id: 7`), or
/// within a flow mapping (`- { id: 7, ... }`).
fn rule_id(item: &str) -> Option<u32> {
    field(item, "id")?.parse().ok()
}

/// The scalar value of `key` in an item, where the item's own mapping
/// holds it.
fn field(item: &str, key: &str) -> Option<String> {
    let wanted = format!("{key}:");
    for line in item.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix('-').map_or(line, str::trim_start);
        let line = line.strip_prefix('{').map_or(line, str::trim_start);
        for piece in line.split(',') {
            let piece = piece.trim_start().trim_start_matches('{').trim_start();
            if let Some(value) = piece.strip_prefix(wanted.as_str()) {
                let value = value.split('#').next().unwrap_or("");
                let value = value.trim().trim_end_matches('}').trim();
                return Some(unquote(value));
            }
        }
    }
    None
}

fn unquote(value: &str) -> String {
    value.trim_matches(|c| c == '"' || c == '\'').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "\
# My Oasis, as I like it.

uplinks: [eth0]   # the wired one
# DNS as at home
dns:
  enabled: true
  port: 7453

next_rule_id: 4
overlays: []
rules:
# ssh goes direct
- id: 1
  proto: tcp
  dport: '22'
  via: underlay

  # the web, through the detour
- id: 3 # added on Tuesday
  proto: tcp
  dport: '80'
  via: underlay
# trailing words
";

    fn render(skeleton: &Skeleton, next: u32, overlays: &[&str], rules: &[&str]) -> String {
        let mut out = String::new();
        skeleton.render(next, overlays, rules.iter().copied(), &mut out);
        out
    }

    #[test]
    fn the_users_text_is_kept_and_the_daemons_keys_written_anew() {
        let (skeleton, items) = parse(USER).unwrap();
        assert_eq!(items.rules.len(), 2);
        assert!(
            items.rules[&1].starts_with("# ssh goes direct\n- id: 1\n"),
            "{:?}",
            items.rules[&1]
        );
        assert!(items.rules[&3].contains("# added on Tuesday"));
        // A rule deleted, one added: the rest of the file as it was.
        let new = "- id: 4\n  proto: udp\n  dport: '53'\n  via: underlay\n";
        let text = render(&skeleton, 5, &[], &[&items.rules[&3], new]);
        let expected = "\
# My Oasis, as I like it.

uplinks: [eth0]   # the wired one
# DNS as at home
dns:
  enabled: true
  port: 7453

next_rule_id: 5
overlays: []
rules:

  # the web, through the detour
- id: 3 # added on Tuesday
  proto: tcp
  dport: '80'
  via: underlay
# trailing words
- id: 4
  proto: udp
  dport: '53'
  via: underlay
";
        assert_eq!(text, expected);
        // What it renders reads back as the same items.
        let (again, items_again) = parse(&text).unwrap();
        assert_eq!(again, skeleton);
        assert_eq!(items_again.rules.len(), 2);
        assert_eq!(
            render(&again, 5, &[], &[&items_again.rules[&3], &items_again.rules[&4]]),
            text
        );
    }

    #[test]
    fn keys_the_file_lacks_are_added_and_flow_values_replaced() {
        let (skeleton, items) =
            parse("uplinks: []\nrules: [ {id: 1, proto: tcp, via: underlay} ]\n").unwrap();
        assert!(items.rules.is_empty());
        let text = render(
            &skeleton,
            2,
            &["- name: exit\n  url: http://x/\n"],
            &["- id: 1\n  proto: tcp\n  via: underlay\n"],
        );
        assert_eq!(
            text,
            "uplinks: []\nrules:\n- id: 1\n  proto: tcp\n  via: underlay\nnext_rule_id: 2\noverlays:\n- name: exit\n  url: http://x/\n"
        );
        assert!(parse("# nothing but a comment\n").is_none());
        // A file without a final newline.
        let (skeleton, _) = parse("tun: { name: oasis0 }").unwrap();
        assert_eq!(
            render(&skeleton, 1, &[], &[]),
            "tun: { name: oasis0 }\nnext_rule_id: 1\noverlays: []\nrules: []\n"
        );
    }

    #[test]
    fn items_indented_under_their_key_and_in_flow_style_are_found() {
        let text = "\
rules:
  - id: 7   # mine
    proto: tcp
    via: underlay
  - {id: 9, proto: udp, via: underlay}
overlays:
  # the exit at work
  - name: 'work'
    url: https://example.org/work.xml
";
        let (_, items) = parse(text).unwrap();
        assert_eq!(
            items
                .rules
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [7, 9].into()
        );
        assert_eq!(
            items.rules[&7],
            "- id: 7   # mine\n  proto: tcp\n  via: underlay\n"
        );
        assert_eq!(items.rules[&9], "- {id: 9, proto: udp, via: underlay}\n");
        assert_eq!(
            items.overlays["work"],
            "# the exit at work\n- name: 'work'\n  url: https://example.org/work.xml\n"
        );
    }
}

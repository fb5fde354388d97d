//! Who may use the exit node: client prefixes, each with a priority class
//! and optionally a token the client's shim must carry. Written on the
//! command line as `PREFIX[,class=N][,token=HEX]`.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub prefix: IpNet,
    pub class: u8,
    pub token: Option<Vec<u8>>,
}

impl FromStr for Client {
    type Err = String;
    fn from_str(text: &str) -> Result<Client, String> {
        let mut parts = text.split(',');
        let prefix_text = parts.next().unwrap_or("").trim();
        let prefix = prefix_text
            .parse::<IpNet>()
            .or_else(|_| prefix_text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{prefix_text:?} is not an address or prefix"))?
            .trunc();
        let mut client = Client {
            prefix,
            class: 0,
            token: None,
        };
        for part in parts {
            match part.trim().split_once('=') {
                Some(("class", n)) => {
                    client.class = n
                        .parse()
                        .map_err(|_| format!("class {n:?} is not a number 0-255"))?;
                }
                Some(("token", hex)) => {
                    let bytes: Option<Vec<u8>> = (hex.len() % 2 == 0)
                        .then(|| {
                            (0..hex.len() / 2)
                                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                                .collect()
                        })
                        .flatten();
                    client.token = Some(
                        bytes
                            .filter(|b| !b.is_empty())
                            .ok_or(format!("token {hex:?} is not hex bytes"))?,
                    );
                }
                _ => return Err(format!("{part:?}: expected class=N or token=HEX")),
            }
        }
        Ok(client)
    }
}

/// Finds the client entry for a sender: the most specific prefix wins.
pub fn lookup(clients: &[Client], addr: IpAddr) -> Option<&Client> {
    let addr = addr.to_canonical();
    clients
        .iter()
        .filter(|c| c.prefix.contains(&addr))
        .max_by_key(|c| c.prefix.prefix_len())
}

/// Whether a datagram's shim authorises it for this client.
pub fn authorised(client: &Client, shim: &[u8]) -> bool {
    match &client.token {
        None => true,
        Some(token) => shim.len() >= token.len() && &shim[..token.len()] == token.as_slice(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefix_class_and_token() {
        let c: Client = "10.77.1.0/24,class=1,token=a1b2".parse().unwrap();
        assert_eq!(
            (c.prefix.to_string(), c.class, c.token),
            ("10.77.1.0/24".into(), 1, Some(vec![0xa1, 0xb2]))
        );
        let host: Client = "10.77.1.2".parse().unwrap();
        assert_eq!(host.prefix.to_string(), "10.77.1.2/32");
        assert!("10.77.1.0/24,class=x".parse::<Client>().is_err());
        assert!("10.77.1.0/24,token=abc".parse::<Client>().is_err());
        assert!("nonsense".parse::<Client>().is_err());
        assert!("10.0.0.0/8,colour=red".parse::<Client>().is_err());
    }

    #[test]
    fn most_specific_prefix_wins_and_strangers_are_refused() {
        let clients: Vec<Client> = ["10.0.0.0/8,class=2", "10.77.1.0/24,class=0"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(lookup(&clients, "10.77.1.9".parse().unwrap()).unwrap().class, 0);
        assert_eq!(lookup(&clients, "10.9.9.9".parse().unwrap()).unwrap().class, 2);
        assert_eq!(
            lookup(&clients, "::ffff:10.9.9.9".parse().unwrap())
                .unwrap()
                .class,
            2
        );
        assert!(lookup(&clients, "192.0.2.1".parse().unwrap()).is_none());
    }

    #[test]
    fn tokens_must_match() {
        let c: Client = "10.0.0.0/8,token=0102".parse().unwrap();
        assert!(authorised(&c, &[1, 2, 0, 0]));
        assert!(!authorised(&c, &[1, 3, 0, 0]));
        assert!(!authorised(&c, &[1]));
        assert!(authorised(&"10.0.0.0/8".parse().unwrap(), &[]));
    }
}

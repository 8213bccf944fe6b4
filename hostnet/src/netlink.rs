//! A minimal rtnetlink client: the messages the agent needs to set up the host side of a NIC.
//!
//! - `RTM_GETLINK` by name: a link's index, MTU, flags, master and kind (`bridge`, `tun`, ...).
//! - `RTM_NEWLINK` on an existing index (with `NLM_F_ACK`): its MTU, its master (a bridge) and
//!   `IFF_UP`, in one message.
//! - `RTM_DELLINK` by index.
//!
//! Messages are built and parsed by pure functions ([`encode_get_link`], [`encode_set_link`],
//! [`encode_delete_link`], [`parse_reply`]) so that the wire format is tested without a kernel;
//! [`Netlink`] only sends them and reads the answer.

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// Nested attributes carry this bit in their type on some paths; it is not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const IFF_UP: u32 = 0x1;
/// Room for one reply: a link's full description is a few KiB.
const RECV_BUF_LEN: usize = 64 * 1024;

/// Why a netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened, or sending or receiving failed.
    #[error("netlink socket")]
    Socket(#[source] io::Error),
    /// The kernel refused the request with this error.
    #[error("{op}")]
    Refused {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer does not parse (or answers another request).
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
    /// The name cannot be an interface name.
    #[error("'{0}' is not an interface name")]
    InvalidName(String),
}

/// What the kernel says of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its interface index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its `IFF_*` flags.
    pub flags: u32,
    /// The index of the bridge (or bond) it is a port of, if any.
    pub master: Option<u32>,
    /// Its `IFLA_INFO_KIND`: `bridge`, `tun`, `veth`, ...; none for plain devices such as `lo`.
    pub kind: Option<String>,
}

impl Link {
    /// Whether it is a Linux bridge.
    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    /// Whether it is administratively up.
    pub fn is_up(&self) -> bool {
        self.flags & IFF_UP != 0
    }
}

/// What [`encode_set_link`] changes; `None` leaves a setting alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkChange {
    /// A new MTU.
    pub mtu: Option<u32>,
    /// The index of the bridge to make it a port of.
    pub master: Option<u32>,
    /// Bring it up.
    pub up: bool,
}

/// A parsed reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An acknowledgement (`NLMSG_ERROR` with error 0).
    Ack,
    /// A link's description (`RTM_NEWLINK`).
    Link(Link),
    /// The kernel refused: a positive errno.
    Error(i32),
}

fn push_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn push_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends one attribute (`struct rtattr` and the payload, padded to 4 bytes).
fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    // Callers pass at most a name of 16 bytes or a u32: the length fits a u16.
    push_u16(buf, (4 + payload.len()) as u16);
    push_u16(buf, kind);
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// A message of `kind` with an `ifinfomsg` for `index` (0: none), `flags`/`change` and
/// `attrs` appended by the closure; the length is filled in at the end.
fn link_message(
    kind: u16,
    nl_flags: u16,
    seq: u32,
    index: u32,
    ifi_flags: u32,
    ifi_change: u32,
    attrs: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    push_u32(&mut buf, 0); // nlmsg_len, below
    push_u16(&mut buf, kind);
    push_u16(&mut buf, nl_flags);
    push_u32(&mut buf, seq);
    push_u32(&mut buf, 0); // nlmsg_pid: the kernel fills in the socket's
    buf.push(libc::AF_UNSPEC as u8); // ifi_family
    buf.push(0); // padding
    push_u16(&mut buf, 0); // ifi_type
                           // Interface indexes are positive ints; the kernel reads the field as one.
    buf.extend_from_slice(&(index as i32).to_ne_bytes());
    push_u32(&mut buf, ifi_flags);
    push_u32(&mut buf, ifi_change);
    attrs(&mut buf);
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn name_payload(name: &str) -> Result<Vec<u8>, NetlinkError> {
    if name.is_empty() || name.len() > crate::tap::MAX_NAME_LEN || name.bytes().any(|b| b == 0) {
        return Err(NetlinkError::InvalidName(name.to_string()));
    }
    let mut payload = name.as_bytes().to_vec();
    payload.push(0);
    Ok(payload)
}

/// `RTM_GETLINK` for the link named `name`.
pub fn encode_get_link(seq: u32, name: &str) -> Result<Vec<u8>, NetlinkError> {
    let payload = name_payload(name)?;
    Ok(link_message(RTM_GETLINK, NLM_F_REQUEST, seq, 0, 0, 0, |b| {
        push_attr(b, IFLA_IFNAME, &payload)
    }))
}

/// `RTM_NEWLINK` changing link `index` as `change` says, acknowledged.
pub fn encode_set_link(seq: u32, index: u32, change: LinkChange) -> Vec<u8> {
    let (flags, mask) = if change.up { (IFF_UP, IFF_UP) } else { (0, 0) };
    link_message(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        index,
        flags,
        mask,
        |b| {
            if let Some(mtu) = change.mtu {
                push_attr(b, IFLA_MTU, &mtu.to_ne_bytes());
            }
            if let Some(master) = change.master {
                push_attr(b, IFLA_MASTER, &master.to_ne_bytes());
            }
        },
    )
}

/// `RTM_DELLINK` of link `index`, acknowledged.
pub fn encode_delete_link(seq: u32, index: u32) -> Vec<u8> {
    link_message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, index, 0, 0, |_| {})
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `b`, as (type without flag bits, payload); stops at the first malformed one.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, at)?);
        let kind = u16_at(b, at + 2)? & NLA_TYPE_MASK;
        let payload = b.get(at + 4..at + len)?;
        at += align4(len.max(4));
        Some((kind, payload))
    })
}

/// A string attribute's text, without the NUL.
fn text(payload: &[u8]) -> String {
    let end = payload.iter().position(|&c| c == 0).unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

fn parse_link(body: &[u8]) -> Result<Link, NetlinkError> {
    let index = u32_at(body, 4).ok_or(NetlinkError::Malformed("short ifinfomsg"))?;
    let flags = u32_at(body, 8).ok_or(NetlinkError::Malformed("short ifinfomsg"))?;
    let mut link = Link {
        index,
        name: String::new(),
        mtu: 0,
        flags,
        master: None,
        kind: None,
    };
    for (kind, payload) in attrs(body.get(IFINFOMSG_LEN..).unwrap_or_default()) {
        match kind {
            IFLA_IFNAME => link.name = text(payload),
            IFLA_MTU => link.mtu = u32_at(payload, 0).ok_or(NetlinkError::Malformed("short IFLA_MTU"))?,
            IFLA_MASTER => link.master = u32_at(payload, 0).filter(|&m| m != 0),
            IFLA_LINKINFO => {
                link.kind = attrs(payload)
                    .find(|(k, _)| *k == IFLA_INFO_KIND)
                    .map(|(_, p)| text(p));
            }
            _ => {}
        }
    }
    Ok(link)
}

/// Parses the messages in `buf` (one `recv`) and returns the reply to request `seq`: `None`
/// if `buf` holds none (messages of other sequence numbers are skipped).
pub fn parse_reply(buf: &[u8], seq: u32) -> Result<Option<Reply>, NetlinkError> {
    let mut at = 0;
    while at + NLMSG_HDR_LEN <= buf.len() {
        let len = u32_at(buf, at).ok_or(NetlinkError::Malformed("short header"))? as usize;
        if len < NLMSG_HDR_LEN || at + len > buf.len() {
            return Err(NetlinkError::Malformed("message length out of bounds"));
        }
        let kind = u16_at(buf, at + 4).ok_or(NetlinkError::Malformed("short header"))?;
        let msg_seq = u32_at(buf, at + 8).ok_or(NetlinkError::Malformed("short header"))?;
        let body = &buf[at + NLMSG_HDR_LEN..at + len];
        at += align4(len);
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or(NetlinkError::Malformed("short NLMSG_ERROR"))? as i32;
                return Ok(Some(if code == 0 {
                    Reply::Ack
                } else {
                    Reply::Error(-code)
                }));
            }
            RTM_NEWLINK => return Ok(Some(Reply::Link(parse_link(body)?))),
            NLMSG_DONE => return Err(NetlinkError::Malformed("no answer before NLMSG_DONE")),
            _ => {}
        }
    }
    Ok(None)
}

/// A `NETLINK_ROUTE` socket of the calling thread's network namespace. Blocking; each call is
/// one request and its answer, which the kernel gives at once.
pub struct Netlink {
    socket: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a socket (close-on-exec).
    pub fn open() -> Result<Netlink, NetlinkError> {
        let socket = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            // NETLINK_ROUTE is protocol 0, which rustix spells `None`.
            None,
        )
        .map_err(|e| NetlinkError::Socket(e.into()))?;
        rustix::net::bind(&socket, &SocketAddrNetlink::new(0, 0))
            .map_err(|e| NetlinkError::Socket(e.into()))?;
        Ok(Netlink { socket, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `message` (numbered `seq`) and returns the kernel's reply to it.
    fn call(&mut self, seq: u32, message: &[u8]) -> Result<Reply, NetlinkError> {
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.socket, message, SendFlags::empty(), &kernel)
            .map_err(|e| NetlinkError::Socket(e.into()))?;
        let mut buf = vec![0u8; RECV_BUF_LEN];
        // A bounded number of reads: messages of earlier, abandoned requests are skipped.
        for _ in 0..16 {
            let (n, _) = rustix::net::recv(&self.socket, &mut buf[..], RecvFlags::empty())
                .map_err(|e| NetlinkError::Socket(e.into()))?;
            if let Some(reply) = parse_reply(&buf[..n.min(buf.len())], seq)? {
                return Ok(reply);
            }
        }
        Err(NetlinkError::Malformed("no reply to the request"))
    }

    /// The link named `name`, or `None` if there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let seq = self.next_seq();
        let message = encode_get_link(seq, name)?;
        match self.call(seq, &message)? {
            Reply::Link(link) => Ok(Some(link)),
            Reply::Error(libc::ENODEV) => Ok(None),
            Reply::Error(errno) => Err(refused("RTM_GETLINK", errno)),
            Reply::Ack => Err(NetlinkError::Malformed("RTM_GETLINK answered with an ack")),
        }
    }

    /// Changes link `index` as `change` says, in one message.
    pub fn set_link(&mut self, index: u32, change: LinkChange) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        self.expect_ack("RTM_NEWLINK", seq, &encode_set_link(seq, index, change))
    }

    /// Deletes link `index`.
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        self.expect_ack("RTM_DELLINK", seq, &encode_delete_link(seq, index))
    }

    fn expect_ack(&mut self, op: &'static str, seq: u32, message: &[u8]) -> Result<(), NetlinkError> {
        match self.call(seq, message)? {
            Reply::Ack => Ok(()),
            Reply::Error(errno) => Err(refused(op, errno)),
            Reply::Link(_) => Err(NetlinkError::Malformed("expected an ack")),
        }
    }
}

fn refused(op: &'static str, errno: i32) -> NetlinkError {
    NetlinkError::Refused {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    #[test]
    fn get_link_names_the_link_nul_terminated_and_padded() {
        let m = encode_get_link(7, "br0").unwrap();
        // header 16 + ifinfomsg 16 + rtattr 4 + "br0\0" 4
        assert_eq!(m.len(), 40);
        assert_eq!(m[0..4], ne32(40));
        assert_eq!(m[4..6], ne16(RTM_GETLINK));
        assert_eq!(m[6..8], ne16(NLM_F_REQUEST));
        assert_eq!(m[8..12], ne32(7));
        assert_eq!(m[16..32], [0; 16], "no index, flags or change");
        assert_eq!(m[32..34], ne16(8));
        assert_eq!(m[34..36], ne16(IFLA_IFNAME));
        assert_eq!(&m[36..40], b"br0\0");
        // A 5-byte name with its NUL is padded to 8.
        let m = encode_get_link(1, "vt123").unwrap();
        assert_eq!(m.len(), 16 + 16 + 4 + 8);
        assert_eq!(m[32..34], ne16(10), "the length counts the NUL, not the padding");
        assert!(encode_get_link(1, "").is_err());
        assert!(encode_get_link(1, "sixteen-bytes-xx").is_err());
        assert!(encode_get_link(1, "a\0b").is_err());
    }

    #[test]
    fn set_link_carries_index_up_mtu_and_master() {
        let change = LinkChange {
            mtu: Some(1400),
            master: Some(5),
            up: true,
        };
        let m = encode_set_link(9, 42, change);
        assert_eq!(m.len(), 16 + 16 + 8 + 8);
        assert_eq!(m[0..4], ne32(m.len() as u32));
        assert_eq!(m[4..6], ne16(RTM_NEWLINK));
        assert_eq!(m[6..8], ne16(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(m[20..24], 42i32.to_ne_bytes(), "ifi_index");
        assert_eq!(m[24..28], ne32(IFF_UP), "ifi_flags");
        assert_eq!(m[28..32], ne32(IFF_UP), "ifi_change");
        assert_eq!(m[32..34], ne16(8));
        assert_eq!(m[34..36], ne16(IFLA_MTU));
        assert_eq!(m[36..40], ne32(1400));
        assert_eq!(m[40..42], ne16(8));
        assert_eq!(m[42..44], ne16(IFLA_MASTER));
        assert_eq!(m[44..48], ne32(5));
        // Nothing asked: only the header and the ifinfomsg, changing no flag.
        let m = encode_set_link(1, 3, LinkChange::default());
        assert_eq!(m.len(), 32);
        assert_eq!(m[28..32], ne32(0));
        let m = encode_delete_link(2, 3);
        assert_eq!(
            (m.len(), &m[4..6], &m[20..24]),
            (32, &ne16(RTM_DELLINK)[..], &3i32.to_ne_bytes()[..])
        );
    }

    /// A reply as the kernel writes it: header, then `body`.
    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&ne32((16 + body.len()) as u32));
        m.extend_from_slice(&ne16(kind));
        m.extend_from_slice(&ne16(0));
        m.extend_from_slice(&ne32(seq));
        m.extend_from_slice(&ne32(0));
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    fn error_body(errno: i32) -> Vec<u8> {
        let mut b = (-errno).to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 16]); // the request's header, echoed
        b
    }

    #[test]
    fn acks_and_errors_are_told_apart() {
        assert_eq!(
            parse_reply(&message(NLMSG_ERROR, 3, &error_body(0)), 3).unwrap(),
            Some(Reply::Ack)
        );
        assert_eq!(
            parse_reply(&message(NLMSG_ERROR, 3, &error_body(libc::ENODEV)), 3).unwrap(),
            Some(Reply::Error(libc::ENODEV))
        );
        // Another request's answer is skipped; the one asked for follows it in the same read.
        let mut two = message(NLMSG_ERROR, 2, &error_body(libc::EPERM));
        two.extend(message(NLMSG_ERROR, 3, &error_body(0)));
        assert_eq!(parse_reply(&two, 3).unwrap(), Some(Reply::Ack));
        assert_eq!(
            parse_reply(&message(NLMSG_ERROR, 2, &error_body(0)), 3).unwrap(),
            None
        );
    }

    #[test]
    fn a_link_description_is_decoded() {
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 0]); // family, pad
        body.extend_from_slice(&ne16(1)); // ARPHRD_ETHER
        body.extend_from_slice(&7i32.to_ne_bytes());
        body.extend_from_slice(&ne32(IFF_UP | 0x1000));
        body.extend_from_slice(&ne32(0));
        push_attr(&mut body, IFLA_IFNAME, b"br-test\0");
        push_attr(&mut body, IFLA_MTU, &ne32(9000));
        push_attr(&mut body, 0x99, &[1, 2, 3]); // unknown: skipped
        let mut info = Vec::new();
        push_attr(&mut info, IFLA_INFO_KIND, b"bridge\0");
        push_attr(&mut info, 2, &[0; 12]); // IFLA_INFO_DATA
                                           // The kernel sets NLA_F_NESTED on some nested attributes.
        push_attr(&mut body, IFLA_LINKINFO | 0x8000, &info);
        push_attr(&mut body, IFLA_MASTER, &ne32(3));
        let reply = parse_reply(&message(RTM_NEWLINK, 5, &body), 5).unwrap();
        let Some(Reply::Link(link)) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(
            link,
            Link {
                index: 7,
                name: "br-test".into(),
                mtu: 9000,
                flags: IFF_UP | 0x1000,
                master: Some(3),
                kind: Some("bridge".into()),
            }
        );
        assert!(link.is_bridge() && link.is_up());
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let mut m = message(NLMSG_ERROR, 1, &error_body(0));
        m[0..4].copy_from_slice(&ne32(1000));
        assert!(parse_reply(&m, 1).is_err(), "length past the buffer");
        m[0..4].copy_from_slice(&ne32(8));
        assert!(parse_reply(&m, 1).is_err(), "length below a header");
        assert!(
            parse_reply(&message(NLMSG_ERROR, 1, &[1]), 1).is_err(),
            "short error"
        );
        assert!(
            parse_reply(&message(RTM_NEWLINK, 1, &[0; 6]), 1).is_err(),
            "short ifinfomsg"
        );
        assert!(parse_reply(&message(NLMSG_DONE, 1, &[0; 4]), 1).is_err());
        // Attributes whose length runs past the message end the walk instead of reading on.
        let mut body = vec![0u8; 16];
        body.extend_from_slice(&ne16(200));
        body.extend_from_slice(&ne16(IFLA_MTU));
        let reply = parse_reply(&message(RTM_NEWLINK, 1, &body), 1).unwrap();
        assert!(
            matches!(reply, Some(Reply::Link(Link { mtu: 0, .. }))),
            "{reply:?}"
        );
        // A zero-length attribute does not loop forever.
        let mut body = vec![0u8; 16];
        body.extend_from_slice(&[0; 8]);
        assert!(parse_reply(&message(RTM_NEWLINK, 1, &body), 1).unwrap().is_some());
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    /// Reads only: loopback exists in every network namespace, as index 1.
    #[test]
    fn the_kernel_describes_loopback_and_knows_no_missing_link() {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link("lo").unwrap().unwrap();
        assert_eq!((lo.index, lo.name.as_str()), (1, "lo"));
        assert!(lo.mtu > 0 && !lo.is_bridge(), "{lo:?}");
        assert_eq!(nl.link("vmmt-none0").unwrap(), None);
        assert_eq!(
            nl.link("lo").unwrap().map(|l| l.index),
            Some(1),
            "the socket goes on"
        );
    }
}

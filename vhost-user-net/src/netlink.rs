//! Link configuration over rtnetlink (the `rtnetlink` crate): look links
//! up, bring them up and down, set the MTU, MAC and alias, create a
//! bridge, attach a port to it, add an address. The requests run on a private
//! current-thread tokio runtime; the netlink socket is opened in the
//! network namespace of the thread that calls [`Netlink::new`].

use std::net::IpAddr;
use std::sync::Mutex;

use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

/// Netlink errors.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket or runtime could not be set up.
    #[error("netlink socket")]
    Setup(#[source] std::io::Error),
    /// No link of that name.
    #[error("no network interface {0:?}")]
    NotFound(String),
    /// The kernel refused a request.
    #[error("{what} {link}: {source}")]
    Request {
        /// What was asked.
        what: &'static str,
        /// The link.
        link: String,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
}

/// A netlink connection.
pub struct Netlink {
    rt: Mutex<tokio::runtime::Runtime>,
    handle: Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Netlink")
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

impl Netlink {
    /// Opens a route netlink socket in the caller's network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Setup)?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        });
        Ok(Netlink {
            handle: handle.map_err(NetlinkError::Setup)?,
            rt: Mutex::new(rt),
        })
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .block_on(f)
    }

    /// The index of link `name`, if it exists.
    pub fn index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let r = self.run(async {
            let mut links = self.handle.link().get().match_name(name).execute();
            links.try_next().await
        });
        match r {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                what: "looking up",
                link: name.into(),
                source,
            }),
        }
    }

    /// The alias (IFLA_IFALIAS) of link `name`, if it exists and has one.
    pub fn alias(&self, name: &str) -> Result<Option<String>, NetlinkError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let r = self.run(async {
            let mut links = self.handle.link().get().match_name(name).execute();
            links.try_next().await
        });
        match r {
            Ok(Some(link)) => Ok(link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfAlias(s) => Some(s),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                what: "looking up",
                link: name.into(),
                source,
            }),
        }
    }

    /// Sets the alias (IFLA_IFALIAS) of link `index`.
    pub fn set_alias(&self, name: &str, index: u32, alias: &str) -> Result<(), NetlinkError> {
        self.change(
            "setting the alias of",
            name,
            LinkUnspec::new_with_index(index).alias(alias).build(),
        )
    }

    /// The index of link `name`, which must exist.
    pub fn require(&self, name: &str) -> Result<u32, NetlinkError> {
        self.index(name)?
            .ok_or_else(|| NetlinkError::NotFound(name.into()))
    }

    fn change(
        &self,
        what: &'static str,
        link: &str,
        msg: rtnetlink::packet_route::link::LinkMessage,
    ) -> Result<(), NetlinkError> {
        self.run(self.handle.link().set(msg).execute())
            .map_err(|source| NetlinkError::Request {
                what,
                link: link.into(),
                source,
            })
    }

    /// Sets link `index` (named `name` for messages) up or down.
    pub fn set_up(&self, name: &str, index: u32, up: bool) -> Result<(), NetlinkError> {
        let b = LinkUnspec::new_with_index(index);
        let b = if up { b.up() } else { b.down() };
        self.change(
            if up { "bringing up" } else { "bringing down" },
            name,
            b.build(),
        )
    }

    /// Sets the MTU of link `index`.
    pub fn set_mtu(&self, name: &str, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.change(
            "setting the MTU of",
            name,
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
        )
    }

    /// Sets the MAC address of link `index`.
    pub fn set_mac(&self, name: &str, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.change(
            "setting the MAC address of",
            name,
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
        )
    }

    /// Makes link `index` a port of bridge `bridge`.
    pub fn attach(&self, name: &str, index: u32, bridge: u32) -> Result<(), NetlinkError> {
        self.change(
            "attaching to the bridge",
            name,
            LinkUnspec::new_with_index(index).controller(bridge).build(),
        )
    }

    /// Creates bridge `name` (up) and returns its index.
    pub fn create_bridge(&self, name: &str) -> Result<u32, NetlinkError> {
        let r = self.run(
            self.handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute(),
        );
        match r {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(source) => {
                return Err(NetlinkError::Request {
                    what: "creating bridge",
                    link: name.into(),
                    source,
                })
            }
        }
        self.require(name)
    }

    /// Adds `addr/prefix` to link `index` (already present is fine).
    pub fn add_address(
        &self,
        name: &str,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let r = self.run(self.handle.address().add(index, addr, prefix).execute());
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                what: "adding an address to",
                link: name.into(),
                source,
            }),
        }
    }
}

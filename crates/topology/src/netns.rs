//! Named network namespaces (`/run/netns/NAME`), made and removed through `meshd-netlink`.

pub use meshd_netlink::netns::*;

//! Wake-on-LAN: the magic packet (6 × 0xFF, then the MAC 16 times, then an optional 4- or
//! 6-byte SecureOn password) sent over UDP to a broadcast address.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use crate::vocab::MacAddress;

/// Builds the magic packet for `mac`.
pub fn magic_packet(mac: MacAddress, password: Option<&[u8]>) -> Vec<u8> {
    let mut packet = Vec::with_capacity(6 + 16 * 6 + 6);
    packet.extend_from_slice(&[0xFF; 6]);
    for _ in 0..16 {
        packet.extend_from_slice(&mac.0);
    }
    if let Some(password) = password {
        packet.extend_from_slice(password);
    }
    packet
}

/// Sends the packet to `broadcast:port` (broadcast allowed on the socket).
pub fn send(packet: &[u8], broadcast: IpAddr, port: u16) -> std::io::Result<()> {
    let bind: SocketAddr = match broadcast {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_broadcast(true)?;
    let sent = socket.send_to(packet, (broadcast, port))?;
    if sent != packet.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            packet.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_is_six_ff_then_sixteen_macs() {
        let mac = MacAddress([0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
        let packet = magic_packet(mac, None);
        assert_eq!(packet.len(), 102);
        assert_eq!(&packet[..6], &[0xFF; 6]);
        for i in 0..16 {
            assert_eq!(&packet[6 + 6 * i..12 + 6 * i], &mac.0);
        }
        assert_eq!(magic_packet(mac, Some(&[1, 2, 3, 4, 5, 6])).len(), 108);
    }

    #[test]
    fn it_arrives_on_loopback() {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let packet = magic_packet(MacAddress([0xaa; 6]), None);
        send(&packet, "127.0.0.1".parse().unwrap(), port).unwrap();
        let mut buf = [0u8; 200];
        let (n, _) = listener.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &packet[..]);
    }
}

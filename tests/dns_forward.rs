//! DNS forwarding of names outside the clusterset zone (being written).

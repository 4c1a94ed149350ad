//! JWT-SVIDs: broker minting, bundle publication, validation (being written).

//! bitmote-notary: the tamper-evident record of what sensors measured.

//! Install tokens: any text is parsed; a token that parses is the canonical encoding of its fields
//! (so the text round-trips exactly, apart from surrounding whitespace), and any fields encode to a
//! token that parses back to them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rehost_proto::token::InstallToken;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = InstallToken::parse(&text) {
        assert_eq!(t.encode(), text.trim(), "a parsed token is not canonical");
        assert_eq!(InstallToken::parse(&t.encode()).as_ref(), Ok(&t));
    }
    if data.len() >= 64 {
        let t = InstallToken {
            id: data[..8].try_into().unwrap(),
            secret: data[8..32].try_into().unwrap(),
            server_pin: data[32..64].try_into().unwrap(),
        };
        assert_eq!(InstallToken::parse(&t.encode()), Ok(t));
    }
});

//! Keeps `docs/wire-protocol.md` true: its opcode and error-code tables must
//! list exactly what this crate defines.

use kalandra_proto::{ErrorCode, Opcode, OpcodeClass};

fn spec() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/wire-protocol.md"))
        .expect("docs/wire-protocol.md exists")
}

fn rows(spec: &str, heading: &str) -> Vec<Vec<String>> {
    let section = spec.split(heading).nth(1).expect("section exists");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| value") && !line.starts_with("| code"))
        .map(|line| line.trim_matches('|').split('|').map(|cell| cell.trim().to_string()).collect())
        .collect()
}

#[test]
fn opcode_table_matches_the_code() {
    let spec = spec();
    let table: Vec<_> =
        rows(&spec, "## 3. Opcodes").into_iter().filter(|row| row[0].starts_with("0x")).collect();
    assert_eq!(table.len(), Opcode::ALL.len(), "one row per opcode");
    for (row, opcode) in table.iter().zip(Opcode::ALL) {
        assert_eq!(row[0], format!("0x{:04X}", opcode.to_u16()));
        assert_eq!(row[1], opcode.name());
        let class = match opcode.class() {
            OpcodeClass::Control => "C",
            OpcodeClass::Sequenced => "S",
            OpcodeClass::Ephemeral => "E",
            OpcodeClass::Directory => "D",
            OpcodeClass::Moderation => "M",
        };
        assert_eq!(row[2], class, "{opcode:?}");
        assert_eq!(row[3], opcode.payload_bytes_max().to_string(), "{opcode:?}");
    }
}

#[test]
fn error_code_table_matches_the_code() {
    let spec = spec();
    let table: Vec<_> = rows(&spec, "## 7. Error codes")
        .into_iter()
        .filter(|row| row[0].chars().all(|c| c.is_ascii_digit()) && !row[0].is_empty())
        .collect();
    assert_eq!(table.len(), ErrorCode::ALL.len(), "one row per code");
    for (row, code) in table.iter().zip(ErrorCode::ALL) {
        assert_eq!(row[0], code.to_u16().to_string());
        assert_eq!(row[1], code.name());
    }
}

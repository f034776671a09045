//! Little-endian wire encodings shared by every hop: ring chunks, shard messages,
//! checkpoint uploads and safetensors files all carry f32 (and u32) values as
//! little-endian bytes.

/// The f32 values of little-endian `bytes` (a trailing partial value is ignored; callers
/// check lengths first).
pub fn f32s_le(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The u32 values of little-endian `bytes`.
pub fn u32s_le(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_little_endian() {
        let v = [1.5f32, -2.25, 0.0];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(f32s_le(&bytes).collect::<Vec<_>>(), v);
        assert_eq!(u32s_le(&7u32.to_le_bytes()).collect::<Vec<_>>(), [7]);
    }
}

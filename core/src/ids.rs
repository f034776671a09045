//! Identifiers as newtypes, so a rank is never passed where a step is expected and a job
//! id never where a worker id is.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }
    };
}

macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The bare number (for the wire and for arithmetic).
            pub fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

string_id!(
    /// A job's id at its coordinator (`j-<n>-<tag>`).
    JobId
);
string_id!(
    /// A worker's id at its coordinator (`w-<n>`).
    WorkerId
);
number_id!(
    /// A worker's position in the ring of one generation, `0..world`.
    Rank(u32)
);
number_id!(
    /// A job's generation: a fixed member list and ring; any membership change starts
    /// the next one. The first generation is 1.
    Generation(u64)
);
number_id!(
    /// An optimizer step, counted from 1 over the whole job.
    Step(u64)
);

impl Rank {
    /// The rank as an index into a member list.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl Generation {
    /// The generation after this one.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_serialize_as_their_bare_values() {
        assert_eq!(
            serde_json::to_string(&JobId::from("j-1")).unwrap(),
            "\"j-1\""
        );
        assert_eq!(serde_json::to_string(&Rank(3)).unwrap(), "3");
        assert_eq!(Generation(1).next(), Generation(2));
        assert_eq!(Step(7).to_string(), "7");
    }
}

//! Differential privacy (accountant in progress).

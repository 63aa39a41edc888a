//! The paper's strong-generalisation evaluation.

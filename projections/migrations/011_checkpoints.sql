-- Signed checkpoints of the witness log's Merkle tree (witness.checkpoint): what a third
-- party keeps to check inclusion and consistency proofs against.
CREATE TABLE IF NOT EXISTS checkpoints (
    origin     text   NOT NULL,
    tree_size  bigint NOT NULL,
    root_hash  bytea  NOT NULL,
    note       text   NOT NULL,
    signed_at  bigint NOT NULL,
    PRIMARY KEY (origin, tree_size)
);

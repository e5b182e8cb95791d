// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {VCoin} from "./VCoin.sol";
import {Staking} from "./Staking.sol";

/// @title TaskAnchor
/// @notice Records the consensus outcome of a task once, with the signatures of the staked
/// nodes that agreed to it; mints the task reward (the caller's figure, at most maxReward) to
/// them; on a supermajority for a
/// deterministic task, slashes the staked replicas that were outvoted.
/// @dev Each voter signs (EIP-191 personal_sign) the 32-byte digest
///   keccak256(abi.encode(domain, taskId, resultHash, modelId, uint8(decision)))
/// with domain = keccak256(bytes(string.concat("vcoin-outcome:v1:", network))); this is
/// `vcoind.consensus.outcome.outcome_digest`. `replicas`, `outvoted` and `deterministic` are
/// not covered by those signatures, so slashing is only done when the caller is itself one of
/// the signing voters (an accountable, staked node); see README.md.
/// Needs VCoin's MINTER_ROLE and Staking's SLASHER_ROLE.
contract TaskAnchor is AccessControl {
    uint8 public constant DECISION_MAJORITY = 2;
    uint8 public constant DECISION_SUPERMAJORITY = 3;
    uint256 public constant MAX_VOTERS = 64;
    uint256 public constant MAX_OUTVOTED = 64;

    struct Anchor {
        bytes32 resultHash;
        bytes32 modelId;
        uint8 decision;
        uint64 blockNumber;
        uint32 voterCount;
    }

    /// The part of an anchor the voters' signatures do not cover.
    struct Claim {
        uint16 replicas;
        bool deterministic;
        uint256 reward;
        address[] outvoted;
        uint256[] shares;
    }

    VCoin public immutable token;
    Staking public immutable staking;
    /// keccak256("vcoin-outcome:v1:" + network)
    bytes32 public immutable domain;
    string public network;
    uint256 public maxReward;
    uint256 public slashAmount;

    mapping(bytes32 taskId => Anchor) public anchors;

    event Anchored(
        bytes32 indexed taskId, bytes32 resultHash, bytes32 modelId, uint8 decision, uint256 voterCount
    );
    event Rewarded(bytes32 indexed taskId, address indexed voter, uint256 amount);
    event OutvotedSlashed(bytes32 indexed taskId, address indexed node, uint256 amount);
    event MaxRewardSet(uint256 maxReward);
    event SlashAmountSet(uint256 slashAmount);

    error AlreadyAnchored(bytes32 taskId);
    error BadDecision(uint8 decision);
    error LengthMismatch(uint256 voters, uint256 signatures);
    error TooManyVoters(uint256 count, uint256 max);
    error TooManyOutvoted(uint256 count, uint256 max);
    error BadReplicas(uint16 replicas);
    error BelowQuorum(uint256 voters, uint256 replicas);
    error DuplicateVoter(address voter);
    error BadSignature(address voter);
    error NotStaked(address voter);
    error DuplicateOutvoted(address node);
    error CallerNotVoter(address caller);
    error ZeroAddress();
    error BadShares(uint256 shares, uint256 voters);

    constructor(
        VCoin token_,
        Staking staking_,
        address admin,
        string memory network_,
        uint256 maxReward_,
        uint256 slashAmount_
    ) {
        if (address(token_) == address(0) || address(staking_) == address(0) || admin == address(0)) {
            revert ZeroAddress();
        }
        token = token_;
        staking = staking_;
        network = network_;
        domain = keccak256(bytes(string.concat("vcoin-outcome:v1:", network_)));
        maxReward = maxReward_;
        slashAmount = slashAmount_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// The digest each voter signs (before the EIP-191 prefix).
    function outcomeDigest(bytes32 taskId, bytes32 resultHash, bytes32 modelId, uint8 decision)
        public
        view
        returns (bytes32)
    {
        return keccak256(abi.encode(domain, taskId, resultHash, modelId, decision));
    }

    /// Anchors a task's outcome.
    /// @param taskId bytes32(uint256(uint128(task id)))
    /// @param resultHash sha256 of the agreed result text
    /// @param modelId the 32 bytes of "sha256:<hex>"
    /// @param decision 2 majority or 3 supermajority
    /// @param voters signer addresses, each staked and eligible, no repeats
    /// @param signatures 65-byte signatures, one per voter, same order
    /// @param claim what the signatures do not cover (the caller's claim, see README.md):
    ///        replicas assigned (quorum is voters * 2 > replicas); whether replicas had to agree
    ///        token for token (deterministic); the reward in VCOIN wei, split equally between
    ///        the voters and capped at maxReward (the node computes it from the task's price and
    ///        tokens); the replicas outside the winning cluster (slashed only if deterministic,
    ///        decision 3, the caller is a voter, and they are not voters themselves); and
    ///        `shares`: empty for an equal split, else one weight per voter, same order (the
    ///        reward is split pro rata, e.g. by samples each node trained)
    function anchor(
        bytes32 taskId,
        bytes32 resultHash,
        bytes32 modelId,
        uint8 decision,
        address[] calldata voters,
        bytes[] calldata signatures,
        Claim calldata claim
    ) external {
        if (anchors[taskId].blockNumber != 0) revert AlreadyAnchored(taskId);
        if (decision != DECISION_MAJORITY && decision != DECISION_SUPERMAJORITY) revert BadDecision(decision);
        if (voters.length != signatures.length) revert LengthMismatch(voters.length, signatures.length);
        if (voters.length > MAX_VOTERS) revert TooManyVoters(voters.length, MAX_VOTERS);
        if (claim.outvoted.length > MAX_OUTVOTED) revert TooManyOutvoted(claim.outvoted.length, MAX_OUTVOTED);
        if (claim.replicas == 0) revert BadReplicas(claim.replicas);
        if (voters.length * 2 <= claim.replicas) revert BelowQuorum(voters.length, claim.replicas);

        _checkVoters(outcomeDigest(taskId, resultHash, modelId, decision), voters, signatures);

        anchors[taskId] = Anchor(resultHash, modelId, decision, uint64(block.number), uint32(voters.length));
        emit Anchored(taskId, resultHash, modelId, decision, voters.length);

        _reward(taskId, voters, claim.reward, claim.shares);
        if (
            claim.deterministic && decision == DECISION_SUPERMAJORITY && claim.outvoted.length > 0
                && slashAmount > 0
        ) {
            _slashOutvoted(taskId, voters, claim.outvoted);
        }
    }

    function _checkVoters(bytes32 digest, address[] calldata voters, bytes[] calldata signatures) private view {
        bytes32 hash = MessageHashUtils.toEthSignedMessageHash(digest);
        for (uint256 i = 0; i < voters.length; ++i) {
            address voter = voters[i];
            for (uint256 j = 0; j < i; ++j) {
                if (voters[j] == voter) revert DuplicateVoter(voter);
            }
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(hash, signatures[i]);
            if (err != ECDSA.RecoverError.NoError || signer != voter) revert BadSignature(voter);
            if (!staking.isEligible(voter)) revert NotStaked(voter);
        }
    }

    /// Splits min(reward, maxReward) equally, or pro rata to `shares` (the remainder of the
    /// division is not minted); near the supply cap only what is left is minted, so an anchor
    /// never fails for lack of supply.
    function _reward(bytes32 taskId, address[] calldata voters, uint256 reward, uint256[] calldata shares)
        private
    {
        uint256 weights = voters.length;
        if (shares.length != 0) {
            if (shares.length != voters.length) revert BadShares(shares.length, voters.length);
            weights = 0;
            for (uint256 i = 0; i < shares.length; ++i) {
                weights += shares[i];
            }
            if (weights == 0) revert BadShares(0, voters.length);
        }
        uint256 total = reward < maxReward ? reward : maxReward;
        uint256 available = token.MAX_SUPPLY() - token.totalSupply();
        if (total > available) total = available;
        for (uint256 i = 0; i < voters.length; ++i) {
            uint256 share = total * (shares.length == 0 ? 1 : shares[i]) / weights;
            if (share == 0) continue;
            token.mint(voters[i], share);
            emit Rewarded(taskId, voters[i], share);
        }
    }

    function _slashOutvoted(bytes32 taskId, address[] calldata voters, address[] calldata outvoted) private {
        if (!_contains(voters, msg.sender)) revert CallerNotVoter(msg.sender);
        uint256 amount = slashAmount;
        for (uint256 i = 0; i < outvoted.length; ++i) {
            address node = outvoted[i];
            for (uint256 j = 0; j < i; ++j) {
                if (outvoted[j] == node) revert DuplicateOutvoted(node);
            }
            if (_contains(voters, node) || staking.slashableOf(node) == 0) continue;
            uint256 slashed = staking.slash(node, amount);
            emit OutvotedSlashed(taskId, node, slashed);
        }
    }

    function _contains(address[] calldata list, address a) private pure returns (bool) {
        for (uint256 i = 0; i < list.length; ++i) {
            if (list[i] == a) return true;
        }
        return false;
    }

    // ---- admin ----

    function setMaxReward(uint256 maxReward_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        maxReward = maxReward_;
        emit MaxRewardSet(maxReward_);
    }

    function setSlashAmount(uint256 slashAmount_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        slashAmount = slashAmount_;
        emit SlashAmountSet(slashAmount_);
    }
}

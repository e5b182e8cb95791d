// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {VCoin} from "./VCoin.sol";
import {Staking} from "./Staking.sol";

/// @title TaskAnchor (settlement v2)
/// @notice Escrow and settlement of tasks. A requester deposits VCOIN, signs a Ticket for a
/// task and an Award for each worker it assigns. The agreeing workers sign the Outcome;
/// `anchor` records it once and pays each agreeing worker price x units from the requester's
/// deposit (a part burned, a fee to the staking reserve, a capped mint on top). A worker left
/// out of the anchor is paid the same by `claim`. `slash` takes stake from a node whose own
/// signed Result contradicts a deterministic supermajority of its numeric profile.
/// @dev Everything signed is EIP-712 typed data under the domain ("VCoin:" + network, "2",
/// chain id, this contract); `vcoind/chain/typed.py` is the Python reference. Needs VCoin's
/// MINTER_ROLE and BURNER_ROLE and Staking's SLASHER_ROLE.
contract TaskAnchor is AccessControl, EIP712 {
    using SafeERC20 for VCoin;

    uint8 public constant DECISION_MAJORITY = 2;
    uint8 public constant DECISION_SUPERMAJORITY = 3;
    uint256 public constant MAX_VOTERS = 64;
    uint256 private constant BPS = 10_000;

    bytes32 private constant TICKET_TYPEHASH = keccak256(
        "Ticket(bytes32 taskId,address requester,bytes32 modelId,uint8 mode,uint16 replicas,bool deterministic,bytes32 profile,uint256 maxPricePerToken,uint32 maxTokens,uint64 deadline,uint64 nonce)"
    );
    bytes32 private constant AWARD_TYPEHASH = keccak256("Award(bytes32 ticketHash,address worker,uint256 pricePerToken)");
    bytes32 private constant RESULT_TYPEHASH = keccak256("Result(bytes32 taskId,bytes32 resultHash,bytes32 profile)");
    bytes32 private constant OUTCOME_TYPEHASH = keccak256(
        "Outcome(bytes32 taskId,bytes32 ticketHash,bytes32 resultHash,uint8 decision,uint32 units,bytes32 profile)"
    );

    struct Params {
        uint256 slashAmount;
        uint16 feeBps;
        uint16 burnBps;
        uint16 mintBps;
        uint64 epochLength;
        uint256 epochMintCap;
        uint64 withdrawDelay;
    }

    /// The requester's order (signed by `requester`).
    struct Ticket {
        bytes32 taskId;
        address requester;
        bytes32 modelId;
        uint8 mode;
        uint16 replicas;
        bool deterministic;
        bytes32 profile;
        uint256 maxPricePerToken;
        uint32 maxTokens;
        uint64 deadline;
        uint64 nonce;
    }

    /// The agreed outcome (taskId and ticketHash come from the ticket).
    struct Outcome {
        bytes32 resultHash;
        uint8 decision;
        uint32 units;
        bytes32 profile;
    }

    /// One agreeing worker: its price (the requester's Award) and its Outcome signature.
    struct Vote {
        address worker;
        uint256 price;
        bytes awardSig;
        bytes outcomeSig;
    }

    struct Anchor {
        bytes32 resultHash;
        bytes32 modelId;
        bytes32 ticketHash;
        address requester;
        uint8 decision;
        bool deterministic;
        uint32 units;
        bytes32 profile;
        uint64 blockNumber;
        uint32 voterCount;
    }

    struct Escrow {
        uint256 available;
        uint256 pending;
        uint64 releaseTime;
    }

    VCoin public immutable token;
    Staking public immutable staking;
    string public network;

    uint256 public slashAmount;
    uint16 public feeBps;
    uint16 public burnBps;
    uint16 public mintBps;
    uint64 public epochLength;
    uint64 public withdrawDelay;
    uint256 public epochMintCap;
    /// The epoch `mintedInEpoch` counts for.
    uint64 public mintEpoch;
    uint192 public mintedInEpoch;

    mapping(bytes32 taskId => Anchor) public anchors;
    mapping(bytes32 taskId => mapping(address worker => bool)) public paid;
    mapping(bytes32 taskId => mapping(address node => bool)) public slashed;
    mapping(address requester => Escrow) private _escrow;

    event Anchored(
        bytes32 indexed taskId, bytes32 resultHash, bytes32 modelId, uint8 decision, uint256 voterCount
    );
    event Paid(
        bytes32 indexed taskId,
        address indexed worker,
        uint256 gross,
        uint256 toWorker,
        uint256 burned,
        uint256 fee,
        uint256 minted
    );
    event Underfunded(bytes32 indexed taskId, address indexed requester, uint256 short);
    event Slashed(bytes32 indexed taskId, address indexed node, uint256 amount);
    event Deposited(address indexed requester, uint256 amount, uint256 balance);
    event WithdrawalRequested(address indexed requester, uint256 amount, uint256 pending, uint64 releaseTime);
    event DepositWithdrawn(address indexed requester, uint256 amount);
    event SlashAmountSet(uint256 slashAmount);
    event FeesSet(uint16 feeBps, uint16 burnBps, uint16 mintBps);
    event EpochMintCapSet(uint256 epochMintCap);
    event EpochLengthSet(uint64 epochLength);
    event WithdrawDelaySet(uint64 withdrawDelay);

    error AlreadyAnchored(bytes32 taskId);
    error BadDecision(uint8 decision);
    error BadTicket();
    error BadReplicas(uint16 replicas);
    error TooManyVoters(uint256 count, uint256 max);
    error UnitsAboveMax(uint32 units, uint32 maxTokens);
    error DuplicateVoter(address voter);
    error PriceAboveMax(address worker, uint256 price, uint256 maxPrice);
    error BadAward(address worker);
    error BadSignature(address signer);
    error NotStaked(address worker);
    error BelowQuorum(uint256 votes, uint256 replicas);
    error NotAnchored(bytes32 taskId);
    error TicketMismatch();
    error AlreadyPaid(bytes32 taskId, address worker);
    error NotSlashable(bytes32 taskId);
    error SameResult();
    error AlreadySlashed(bytes32 taskId, address node);
    error NothingToSlash(address node);
    error BadFees(uint16 feeBps, uint16 burnBps, uint16 mintBps);
    error BadEpochLength();
    error ZeroAddress();
    error ZeroAmount();
    error InsufficientDeposit(uint256 requested, uint256 available);
    error NothingToWithdraw();
    error WithdrawalLocked(uint64 releaseTime);

    constructor(VCoin token_, Staking staking_, address admin, string memory network_, Params memory p)
        EIP712(string.concat("VCoin:", network_), "2")
    {
        if (address(token_) == address(0) || address(staking_) == address(0) || admin == address(0)) {
            revert ZeroAddress();
        }
        token = token_;
        staking = staking_;
        network = network_;
        slashAmount = p.slashAmount;
        _setFees(p.feeBps, p.burnBps, p.mintBps);
        _setEpochLength(p.epochLength);
        epochMintCap = p.epochMintCap;
        withdrawDelay = p.withdrawDelay;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    // ---- hashes ----

    /// The Ticket's EIP-712 struct hash (`ticketHash` in awards and outcomes).
    function ticketHash(Ticket calldata t) public pure returns (bytes32) {
        return keccak256(abi.encode(TICKET_TYPEHASH, t));
    }

    /// The full EIP-712 digest every agreeing worker signs.
    function outcomeDigest(Ticket calldata t, Outcome calldata o) external view returns (bytes32) {
        return _outcomeDigest(t.taskId, ticketHash(t), o.resultHash, o.decision, o.units, o.profile);
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _outcomeDigest(
        bytes32 taskId,
        bytes32 tHash,
        bytes32 resultHash,
        uint8 decision,
        uint32 units,
        bytes32 profile
    ) private view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(abi.encode(OUTCOME_TYPEHASH, taskId, tHash, resultHash, decision, units, profile))
        );
    }

    function _signedBy(bytes32 digest, bytes calldata sig, address signer) private pure returns (bool) {
        (address got, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, sig);
        return err == ECDSA.RecoverError.NoError && got == signer && signer != address(0);
    }

    // ---- escrow ----

    /// Adds `amount` VCOIN of the caller to its deposit (needs an allowance for this contract).
    function deposit(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Escrow storage e = _escrow[msg.sender];
        uint256 balance = e.available + amount;
        e.available = balance;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Deposited(msg.sender, amount, balance);
    }

    /// Moves `amount` of the available deposit to pending; the whole pending amount is
    /// released `withdrawDelay` seconds after the latest request. Pending still pays for work.
    function requestWithdrawal(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Escrow storage e = _escrow[msg.sender];
        uint256 available = e.available;
        if (amount > available) revert InsufficientDeposit(amount, available);
        e.available = available - amount;
        uint256 pending = e.pending + amount;
        e.pending = pending;
        uint64 release = uint64(block.timestamp) + withdrawDelay;
        e.releaseTime = release;
        emit WithdrawalRequested(msg.sender, amount, pending, release);
    }

    /// Pays out the caller's whole pending amount once its release time has come.
    function withdrawDeposit() external {
        Escrow storage e = _escrow[msg.sender];
        uint256 amount = e.pending;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < e.releaseTime) revert WithdrawalLocked(e.releaseTime);
        e.pending = 0;
        e.releaseTime = 0;
        token.safeTransfer(msg.sender, amount);
        emit DepositWithdrawn(msg.sender, amount);
    }

    function depositOf(address requester)
        external
        view
        returns (uint256 available, uint256 pending, uint64 releaseTime)
    {
        Escrow storage e = _escrow[requester];
        return (e.available, e.pending, e.releaseTime);
    }

    /// What can still be minted in the current epoch (before the supply cap).
    function mintRoom() public view returns (uint256) {
        uint256 used = uint64(block.timestamp / epochLength) == mintEpoch ? mintedInEpoch : 0;
        uint256 cap = epochMintCap;
        return cap > used ? cap - used : 0;
    }

    // ---- settlement ----

    /// Records the outcome of the ticket's task and pays every vote.
    /// @param t the requester's ticket; `ticketSig` its signature by `t.requester`
    /// @param o the agreed outcome, signed by every voter (EIP-712 Outcome)
    /// @param votes agreeing, awarded, staked workers, no repeats; quorum: votes * 2 > t.replicas
    function anchor(Ticket calldata t, bytes calldata ticketSig, Outcome calldata o, Vote[] calldata votes)
        external
    {
        bytes32 taskId = t.taskId;
        if (anchors[taskId].blockNumber != 0) revert AlreadyAnchored(taskId);
        if (o.decision != DECISION_MAJORITY && o.decision != DECISION_SUPERMAJORITY) revert BadDecision(o.decision);
        bytes32 tHash = ticketHash(t);
        if (!_signedBy(_hashTypedDataV4(tHash), ticketSig, t.requester)) revert BadTicket();
        if (t.replicas == 0) revert BadReplicas(0);
        if (votes.length > MAX_VOTERS) revert TooManyVoters(votes.length, MAX_VOTERS);
        if (o.units > t.maxTokens) revert UnitsAboveMax(o.units, t.maxTokens);

        bytes32 digest = _outcomeDigest(taskId, tHash, o.resultHash, o.decision, o.units, o.profile);
        for (uint256 i = 0; i < votes.length; ++i) {
            address w = votes[i].worker;
            for (uint256 j = 0; j < i; ++j) {
                if (votes[j].worker == w) revert DuplicateVoter(w);
            }
            _checkVote(t, tHash, digest, votes[i]);
        }
        if (votes.length * 2 <= t.replicas) revert BelowQuorum(votes.length, t.replicas);

        anchors[taskId] = Anchor({
            resultHash: o.resultHash,
            modelId: t.modelId,
            ticketHash: tHash,
            requester: t.requester,
            decision: o.decision,
            deterministic: t.deterministic,
            units: o.units,
            profile: o.profile,
            blockNumber: uint64(block.number),
            voterCount: uint32(votes.length)
        });
        emit Anchored(taskId, o.resultHash, t.modelId, o.decision, votes.length);

        _payAll(taskId, t.requester, votes, o.units);
    }

    /// Pays an agreeing, awarded worker whose vote was left out of the anchor, exactly as the
    /// anchor would have.
    function claim(Ticket calldata t, Vote calldata v) external {
        bytes32 taskId = t.taskId;
        Anchor storage a = anchors[taskId];
        if (a.blockNumber == 0) revert NotAnchored(taskId);
        bytes32 tHash = ticketHash(t);
        if (tHash != a.ticketHash) revert TicketMismatch();
        if (paid[taskId][v.worker]) revert AlreadyPaid(taskId, v.worker);
        uint32 units = a.units;
        bytes32 digest = _outcomeDigest(taskId, tHash, a.resultHash, a.decision, units, a.profile);
        _checkVote(t, tHash, digest, v);
        (uint256 burned, uint256 fee) = _pay(taskId, t.requester, v.worker, _gross(v.price, units));
        _burnAndFee(burned, fee);
    }

    function _checkVote(Ticket calldata t, bytes32 tHash, bytes32 digest, Vote calldata v) private view {
        address w = v.worker;
        if (v.price > t.maxPricePerToken) revert PriceAboveMax(w, v.price, t.maxPricePerToken);
        bytes32 award = _hashTypedDataV4(keccak256(abi.encode(AWARD_TYPEHASH, tHash, w, v.price)));
        if (!_signedBy(award, v.awardSig, t.requester)) revert BadAward(w);
        if (!_signedBy(digest, v.outcomeSig, w)) revert BadSignature(w);
        if (!staking.isEligible(w)) revert NotStaked(w);
    }

    function _payAll(bytes32 taskId, address requester, Vote[] calldata votes, uint32 units) private {
        uint256 burned;
        uint256 fee;
        for (uint256 i = 0; i < votes.length; ++i) {
            (uint256 b, uint256 f) = _pay(taskId, requester, votes[i].worker, _gross(votes[i].price, units));
            burned += b;
            fee += f;
        }
        _burnAndFee(burned, fee);
    }

    /// price x units, saturating at 2^256 - 1 (no deposit holds that much: it pays what it
    /// holds instead of reverting).
    function _gross(uint256 price, uint32 units) private pure returns (uint256) {
        if (units != 0 && price > type(uint256).max / units) return type(uint256).max;
        return price * units;
    }

    /// Pays `gross` (price x units) from the requester's deposit, available then pending, or
    /// what it holds: burnBps burned, feeBps to the reserve, the rest to the worker, and
    /// mintBps of it minted to the worker within the epoch's cap and the supply cap. Returns
    /// the burn and the fee, which the caller settles once for all votes (`_burnAndFee`).
    function _pay(bytes32 taskId, address requester, address worker, uint256 gross)
        private
        returns (uint256 burned, uint256 fee)
    {
        paid[taskId][worker] = true;
        uint256 take = _draw(taskId, requester, gross);
        burned = take * burnBps / BPS;
        fee = take * feeBps / BPS;
        uint256 toWorker = take - burned - fee;
        uint256 minted = _mint(worker, take * mintBps / BPS);
        if (toWorker > 0) token.safeTransfer(worker, toWorker);
        emit Paid(taskId, worker, take, toWorker, burned, fee, minted);
    }

    function _burnAndFee(uint256 burned, uint256 fee) private {
        if (burned > 0) token.burn(burned);
        if (fee > 0) token.safeTransfer(staking.reserve(), fee);
    }

    function _draw(bytes32 taskId, address requester, uint256 gross) private returns (uint256 take) {
        if (gross == 0) return 0;
        Escrow storage e = _escrow[requester];
        uint256 available = e.available;
        if (gross <= available) {
            e.available = available - gross;
            return gross;
        }
        uint256 pending = e.pending;
        take = gross;
        if (take > available + pending) {
            take = available + pending;
            emit Underfunded(taskId, requester, gross - take);
        }
        if (available > 0) e.available = 0;
        if (take > available) e.pending = pending - (take - available);
    }

    function _mint(address worker, uint256 want) private returns (uint256 amount) {
        if (want == 0) return 0;
        uint64 epoch = uint64(block.timestamp / epochLength);
        uint256 used = epoch == mintEpoch ? mintedInEpoch : 0;
        uint256 cap = epochMintCap;
        uint256 room = cap > used ? cap - used : 0;
        uint256 supplyRoom = token.MAX_SUPPLY() - token.totalSupply();
        if (supplyRoom < room) room = supplyRoom;
        amount = want < room ? want : room;
        if (amount == 0) return 0;
        mintEpoch = epoch;
        mintedInEpoch = uint192(used + amount);
        token.mint(worker, amount);
    }

    // ---- slashing ----

    /// Slashes `slashAmount` of `node`'s stake when its own signed Result (`sig` over
    /// Result(taskId, resultHash, anchored profile)) contradicts the anchored deterministic
    /// supermajority. Anyone may call it, once per node and task.
    function slash(bytes32 taskId, address node, bytes32 resultHash, bytes calldata sig) external {
        Anchor storage a = anchors[taskId];
        if (a.blockNumber == 0) revert NotAnchored(taskId);
        bytes32 profile = a.profile;
        if (!a.deterministic || a.decision != DECISION_SUPERMAJORITY || profile == bytes32(0) || slashAmount == 0) {
            revert NotSlashable(taskId);
        }
        if (resultHash == a.resultHash) revert SameResult();
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(RESULT_TYPEHASH, taskId, resultHash, profile)));
        if (!_signedBy(digest, sig, node)) revert BadSignature(node);
        if (slashed[taskId][node]) revert AlreadySlashed(taskId, node);
        if (staking.slashableOf(node) == 0) revert NothingToSlash(node);
        slashed[taskId][node] = true;
        uint256 amount = staking.slash(node, slashAmount);
        emit Slashed(taskId, node, amount);
    }

    // ---- admin ----

    function setSlashAmount(uint256 slashAmount_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        slashAmount = slashAmount_;
        emit SlashAmountSet(slashAmount_);
    }

    /// Requires mintBps < burnBps (settling with oneself always loses) and feeBps + burnBps
    /// <= 10000.
    function setFees(uint16 feeBps_, uint16 burnBps_, uint16 mintBps_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setFees(feeBps_, burnBps_, mintBps_);
    }

    function setEpochMintCap(uint256 epochMintCap_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        epochMintCap = epochMintCap_;
        emit EpochMintCapSet(epochMintCap_);
    }

    /// A new length renumbers the epochs: the current epoch's count starts again.
    function setEpochLength(uint64 epochLength_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setEpochLength(epochLength_);
    }

    /// Applies to later withdrawal requests, not to pending ones.
    function setWithdrawDelay(uint64 withdrawDelay_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        withdrawDelay = withdrawDelay_;
        emit WithdrawDelaySet(withdrawDelay_);
    }

    function _setFees(uint16 feeBps_, uint16 burnBps_, uint16 mintBps_) private {
        if (mintBps_ >= burnBps_ || uint256(feeBps_) + burnBps_ > BPS) revert BadFees(feeBps_, burnBps_, mintBps_);
        feeBps = feeBps_;
        burnBps = burnBps_;
        mintBps = mintBps_;
        emit FeesSet(feeBps_, burnBps_, mintBps_);
    }

    function _setEpochLength(uint64 epochLength_) private {
        if (epochLength_ == 0) revert BadEpochLength();
        epochLength = epochLength_;
        emit EpochLengthSet(epochLength_);
    }
}
